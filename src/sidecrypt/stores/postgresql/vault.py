"""The token vault's tables on PostgreSQL (protocol: tokens.table.VaultTable).

Many sidecars share these tables. A first write races only through unique constraints: the
insert is ``ON CONFLICT DO NOTHING`` and the token stored for the blind index is read back,
so two sidecars writing one value at once end with one token. Lookups take whole lists
(``= ANY($n)``): a 1,000-token response is one round trip. ``forget`` deletes rows; dead
tuples stay until VACUUM (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from ...tokens.table import FEATURE, VaultEntry, VaultRoot
from ..base import FeatureTable, Migration, StoreError

if TYPE_CHECKING:
    from .store import PostgresStore

MIGRATIONS = (
    Migration(
        1,
        (
            "CREATE TABLE token_roots ("
            " key TEXT NOT NULL, version INTEGER NOT NULL, wrapped BYTEA NOT NULL,"
            " kek_version INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL,"
            " PRIMARY KEY (key, version))",
            "CREATE TABLE token_vault ("
            " key TEXT NOT NULL, format TEXT NOT NULL, context TEXT NOT NULL,"
            " token TEXT NOT NULL, bidx BYTEA, sealed TEXT NOT NULL,"
            " kek_version INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL,"
            " PRIMARY KEY (key, context, token, format), UNIQUE (bidx))",
            "CREATE INDEX token_vault_context ON token_vault (context)",
        ),
        "token vault: wrapped roots, sealed values, keyed blind index",
    ),
)
CHUNK = 10_000  # tokens per ANY($n) array: one round trip for any list a response holds

_C = "key, format, context, token, bidx, sealed, kek_version, created_at"
_R = "key, version, wrapped, kek_version, created_at"


def _root(found: Any) -> VaultRoot | None:
    if found is None:
        return None
    return VaultRoot(
        str(found["key"]),
        int(found["version"]),
        bytes(found["wrapped"]),
        int(found["kek_version"]),
        float(found["created_at"]),
    )


def _entry(r: Any) -> VaultEntry:
    return VaultEntry(
        str(r["key"]),
        str(r["format"]),
        str(r["context"]),
        str(r["token"]),
        None if r["bidx"] is None else bytes(r["bidx"]),
        str(r["sealed"]),
        int(r["kek_version"]),
        float(r["created_at"]),
    )


def _count(status: str) -> int:
    return int(str(status).rsplit(" ", 1)[-1])


class PostgresVault:
    """One statement per call (a read-back after a lost race is the only second one)."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    async def root(self, key: str) -> VaultRoot | None:
        async def root(conn: asyncpg.Connection) -> VaultRoot | None:
            return _root(
                await conn.fetchrow(
                    f"SELECT {_R} FROM token_roots WHERE key=$1"  # noqa: S608
                    " ORDER BY version DESC LIMIT 1",
                    key,
                )
            )

        return await self.store.run("token_vault.root", root)

    async def insert_root(self, root: VaultRoot) -> VaultRoot:
        async def insert(conn: asyncpg.Connection) -> VaultRoot:
            args = (root.key, root.version, root.wrapped, root.kek_version, root.created_at)
            await conn.execute(
                f"INSERT INTO token_roots ({_R}) VALUES ($1,$2,$3,$4,$5)"  # noqa: S608
                " ON CONFLICT (key, version) DO NOTHING",
                *args,
            )
            stored = _root(
                await conn.fetchrow(
                    f"SELECT {_R} FROM token_roots WHERE key=$1 AND version=$2",  # noqa: S608
                    root.key,
                    root.version,
                )
            )
            if stored is None:
                raise StoreError("token root vanished during insert", code="store_conflict")
            return stored

        return await self.store.run("token_vault.insert_root", insert)

    async def update_root(self, root: VaultRoot, old_wrapped: bytes) -> bool:
        async def update(conn: asyncpg.Connection) -> bool:
            status = await conn.execute(
                "UPDATE token_roots SET wrapped=$1, kek_version=$2"
                " WHERE key=$3 AND version=$4 AND wrapped=$5",
                root.wrapped,
                root.kek_version,
                root.key,
                root.version,
                old_wrapped,
            )
            return _count(status) == 1

        return await self.store.run("token_vault.update_root", update)

    async def by_index(self, bidxs: Sequence[bytes]) -> dict[bytes, str]:
        async def find(conn: asyncpg.Connection) -> dict[bytes, str]:
            out: dict[bytes, str] = {}
            for i in range(0, len(bidxs), CHUNK):
                rows = await conn.fetch(
                    "SELECT bidx, token FROM token_vault WHERE bidx = ANY($1::bytea[])",
                    list(bidxs[i : i + CHUNK]),
                )
                out.update((bytes(r["bidx"]), str(r["token"])) for r in rows)
            return out

        return await self.store.run("token_vault.by_index", find)

    async def insert(self, entry: VaultEntry) -> str | None:
        async def insert(conn: asyncpg.Connection) -> str | None:
            args = (
                entry.key,
                entry.format,
                entry.context,
                entry.token,
                entry.bidx,
                entry.sealed,
                entry.kek_version,
                entry.created_at,
            )
            if entry.bidx is None:
                got = await conn.fetchval(
                    f"INSERT INTO token_vault ({_C}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"  # noqa: S608
                    " ON CONFLICT DO NOTHING RETURNING token",
                    *args,
                )
                return None if got is None else str(got)
            # DO NOTHING returns no row when a constraint held another's; the CTE then reads
            # the token stored for this bidx (same statement). A winner that committed after
            # this statement's snapshot is read by the second query.
            got = await conn.fetchval(
                f"WITH ins AS (INSERT INTO token_vault ({_C})"  # noqa: S608
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT DO NOTHING RETURNING token)"
                " SELECT token FROM ins UNION ALL"
                " SELECT token FROM token_vault WHERE bidx=$5 LIMIT 1",
                *args,
            )
            if got is None:
                got = await conn.fetchval("SELECT token FROM token_vault WHERE bidx=$1", entry.bidx)
            return None if got is None else str(got)

        return await self.store.run("token_vault.insert", insert)

    async def by_tokens(
        self, key: str, context: str, tokens: Sequence[str]
    ) -> list[tuple[str, str, str]]:
        async def find(conn: asyncpg.Connection) -> list[tuple[str, str, str]]:
            out: list[tuple[str, str, str]] = []
            for i in range(0, len(tokens), CHUNK):
                rows = await conn.fetch(
                    "SELECT format, token, sealed FROM token_vault"
                    " WHERE key=$1 AND context=$2 AND token = ANY($3::text[])",
                    key,
                    context,
                    list(tokens[i : i + CHUNK]),
                )
                out.extend((str(r["format"]), str(r["token"]), str(r["sealed"])) for r in rows)
            return out

        return await self.store.run("token_vault.by_tokens", find)

    async def entries(
        self, key: str, after: tuple[str, str, str] | None, limit: int
    ) -> list[VaultEntry]:
        async def page(conn: asyncpg.Connection) -> list[VaultEntry]:
            start = after or ("", "", "")
            rows = await conn.fetch(
                f"SELECT {_C} FROM token_vault WHERE key=$1"  # noqa: S608
                " AND (context, token, format) > ($2, $3, $4)"
                " ORDER BY context, token, format LIMIT $5",
                key,
                *start,
                limit,
            )
            return [_entry(r) for r in rows]

        return await self.store.run("token_vault.entries", page)

    async def update_sealed(self, entry: VaultEntry, old_sealed: str) -> bool:
        async def update(conn: asyncpg.Connection) -> bool:
            status = await conn.execute(
                "UPDATE token_vault SET sealed=$1, kek_version=$2 WHERE key=$3 AND format=$4"
                " AND context=$5 AND token=$6 AND sealed=$7",
                entry.sealed,
                entry.kek_version,
                entry.key,
                entry.format,
                entry.context,
                entry.token,
                old_sealed,
            )
            return _count(status) == 1

        return await self.store.run("token_vault.update_sealed", update)

    async def forget(self, context: str) -> int:
        async def forget(conn: asyncpg.Connection) -> int:
            return _count(await conn.execute("DELETE FROM token_vault WHERE context=$1", context))

        return await self.store.run("token_vault.forget", forget)

    async def stats(self) -> list[tuple[str, int, int]]:
        async def stats(conn: asyncpg.Connection) -> list[tuple[str, int, int]]:
            rows = await conn.fetch(
                "SELECT key, kek_version, count(*) AS n FROM token_vault"
                " GROUP BY key, kek_version ORDER BY key, kek_version"
            )
            return [(str(r["key"]), int(r["kek_version"]), int(r["n"])) for r in rows]

        return await self.store.run("token_vault.stats", stats)


TABLE = FeatureTable(FEATURE, MIGRATIONS, PostgresVault)
