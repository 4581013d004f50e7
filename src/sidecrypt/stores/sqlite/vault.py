"""The token vault's tables on SQLite (protocol: tokens.table.VaultTable)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...tokens.table import FEATURE, VaultEntry, VaultRoot
from ..base import FeatureTable, Migration

if TYPE_CHECKING:
    from .store import SqliteStore

MIGRATIONS = (
    Migration(
        1,
        (
            "CREATE TABLE token_roots ("
            " key TEXT NOT NULL, version INTEGER NOT NULL, wrapped BLOB NOT NULL,"
            " kek_version INTEGER NOT NULL, created_at REAL NOT NULL,"
            " PRIMARY KEY (key, version))",
            "CREATE TABLE token_vault ("
            " key TEXT NOT NULL, format TEXT NOT NULL, context TEXT NOT NULL,"
            " token TEXT NOT NULL, bidx BLOB, sealed TEXT NOT NULL,"
            " kek_version INTEGER NOT NULL, created_at REAL NOT NULL,"
            " PRIMARY KEY (key, context, token, format), UNIQUE (bidx))",
            "CREATE INDEX token_vault_context ON token_vault (context)",
        ),
        "token vault: wrapped roots, sealed values, keyed blind index",
    ),
)
CHUNK = 500  # SQLite's default limit is 999 bound parameters per statement

_C = "key, format, context, token, bidx, sealed, kek_version, created_at"


def _root(found: Any) -> VaultRoot | None:
    if found is None:
        return None
    key, version, wrapped, kek, created = found
    return VaultRoot(str(key), int(version), bytes(wrapped), int(kek), float(created))


def _entry(found: Any) -> VaultEntry:
    key, fmt, context, token, bidx, sealed, kek, created = found
    return VaultEntry(
        str(key),
        str(fmt),
        str(context),
        str(token),
        None if bidx is None else bytes(bidx),
        str(sealed),
        int(kek),
        float(created),
    )


class SqliteVault:
    """Queries run on the store's thread; each call is one statement or one read batch."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    async def root(self, key: str) -> VaultRoot | None:
        def root(conn: sqlite3.Connection) -> VaultRoot | None:
            return _root(
                conn.execute(
                    "SELECT key, version, wrapped, kek_version, created_at FROM token_roots"
                    " WHERE key=? ORDER BY version DESC LIMIT 1",
                    (key,),
                ).fetchone()
            )

        return await self.store.run("token_vault.root", root)

    async def insert_root(self, root: VaultRoot) -> VaultRoot:
        def insert(conn: sqlite3.Connection) -> VaultRoot:
            conn.execute(
                "INSERT INTO token_roots (key, version, wrapped, kek_version, created_at)"
                " VALUES (?,?,?,?,?) ON CONFLICT (key, version) DO NOTHING",
                (root.key, root.version, root.wrapped, root.kek_version, root.created_at),
            )
            stored = _root(
                conn.execute(
                    "SELECT key, version, wrapped, kek_version, created_at FROM token_roots"
                    " WHERE key=? AND version=?",
                    (root.key, root.version),
                ).fetchone()
            )
            assert stored is not None  # roots are never deleted
            return stored

        return await self.store.run("token_vault.insert_root", insert)

    async def update_root(self, root: VaultRoot, old_wrapped: bytes) -> bool:
        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE token_roots SET wrapped=?, kek_version=?"
                " WHERE key=? AND version=? AND wrapped=?",
                (root.wrapped, root.kek_version, root.key, root.version, old_wrapped),
            )
            return cur.rowcount == 1

        return await self.store.run("token_vault.update_root", update)

    async def by_index(self, bidxs: Sequence[bytes]) -> dict[bytes, str]:
        def find(conn: sqlite3.Connection) -> dict[bytes, str]:
            out: dict[bytes, str] = {}
            for i in range(0, len(bidxs), CHUNK):
                chunk = bidxs[i : i + CHUNK]
                marks = ",".join("?" * len(chunk))
                for bidx, token in conn.execute(
                    f"SELECT bidx, token FROM token_vault WHERE bidx IN ({marks})",  # noqa: S608
                    chunk,
                ):
                    out[bytes(bidx)] = str(token)
            return out

        return await self.store.run("token_vault.by_index", find)

    async def insert(self, entry: VaultEntry) -> str | None:
        def insert(conn: sqlite3.Connection) -> str | None:
            cur = conn.execute(
                f"INSERT OR IGNORE INTO token_vault ({_C}) VALUES (?,?,?,?,?,?,?,?)",  # noqa: S608
                (
                    entry.key,
                    entry.format,
                    entry.context,
                    entry.token,
                    entry.bidx,
                    entry.sealed,
                    entry.kek_version,
                    entry.created_at,
                ),
            )
            if entry.bidx is None:
                return entry.token if cur.rowcount == 1 else None
            found = conn.execute(
                "SELECT token FROM token_vault WHERE bidx=?", (entry.bidx,)
            ).fetchone()
            return None if found is None else str(found[0])

        return await self.store.run("token_vault.insert", insert)

    async def by_tokens(
        self, key: str, context: str, tokens: Sequence[str]
    ) -> list[tuple[str, str, str]]:
        def find(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
            out: list[tuple[str, str, str]] = []
            for i in range(0, len(tokens), CHUNK):
                chunk = tokens[i : i + CHUNK]
                marks = ",".join("?" * len(chunk))
                out.extend(
                    (str(f), str(t), str(s))
                    for f, t, s in conn.execute(
                        "SELECT format, token, sealed FROM token_vault"  # noqa: S608
                        f" WHERE key=? AND context=? AND token IN ({marks})",
                        (key, context, *chunk),
                    )
                )
            return out

        return await self.store.run("token_vault.by_tokens", find)

    async def entries(
        self, key: str, after: tuple[str, str, str] | None, limit: int
    ) -> list[VaultEntry]:
        def page(conn: sqlite3.Connection) -> list[VaultEntry]:
            start = after or ("", "", "")
            rows = conn.execute(
                f"SELECT {_C} FROM token_vault WHERE key=?"  # noqa: S608
                " AND (context, token, format) > (?, ?, ?)"
                " ORDER BY context, token, format LIMIT ?",
                (key, *start, limit),
            ).fetchall()
            return [_entry(r) for r in rows]

        return await self.store.run("token_vault.entries", page)

    async def update_sealed(self, entry: VaultEntry, old_sealed: str) -> bool:
        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE token_vault SET sealed=?, kek_version=?"
                " WHERE key=? AND format=? AND context=? AND token=? AND sealed=?",
                (
                    entry.sealed,
                    entry.kek_version,
                    entry.key,
                    entry.format,
                    entry.context,
                    entry.token,
                    old_sealed,
                ),
            )
            return cur.rowcount == 1

        return await self.store.run("token_vault.update_sealed", update)

    async def forget(self, context: str) -> int:
        def forget(conn: sqlite3.Connection) -> int:
            return int(conn.execute("DELETE FROM token_vault WHERE context=?", (context,)).rowcount)

        return await self.store.run("token_vault.forget", forget)

    async def stats(self) -> list[tuple[str, int, int]]:
        def stats(conn: sqlite3.Connection) -> list[tuple[str, int, int]]:
            rows = conn.execute(
                "SELECT key, kek_version, count(*) FROM token_vault"
                " GROUP BY key, kek_version ORDER BY key, kek_version"
            ).fetchall()
            return [(str(k), int(v), int(n)) for k, v, n in rows]

        return await self.store.run("token_vault.stats", stats)


TABLE = FeatureTable(FEATURE, MIGRATIONS, SqliteVault)
