"""The key hierarchy's branch key table on SQLite (protocol: crypto.hierarchy.BranchKeyTable)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from ...crypto.hierarchy.table import FEATURE, BranchKeyRow
from ..base import FeatureTable, Migration, StoreError

if TYPE_CHECKING:
    from .store import SqliteStore

MIGRATIONS = (
    Migration(
        1,
        (
            "CREATE TABLE branch_keys ("
            " key TEXT NOT NULL, branch TEXT NOT NULL, version INTEGER NOT NULL,"
            " branch_id TEXT NOT NULL, wrapped BLOB NOT NULL, kek_version INTEGER NOT NULL,"
            " created_at REAL NOT NULL,"
            " PRIMARY KEY (key, branch, version), UNIQUE (branch_id, version))",
        ),
        "branch key versions, stored wrapped",
    ),
)


def _row(found: Any) -> BranchKeyRow | None:
    if found is None:
        return None
    key, branch, version, branch_id, wrapped, kek_version, created_at = found
    return BranchKeyRow(
        str(key),
        str(branch),
        int(version),
        str(branch_id),
        bytes(wrapped),
        int(kek_version),
        float(created_at),
    )


# Column list: a constant, so the f-string queries below hold no input (hence noqa S608).
_C = "key, branch, version, branch_id, wrapped, kek_version, created_at"


class SqliteBranchKeys:
    """Queries run on the store's thread; the insert is one statement (no read-then-write)."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    async def insert(self, row: BranchKeyRow) -> BranchKeyRow:
        def insert(conn: sqlite3.Connection) -> BranchKeyRow:
            conn.execute(
                f"INSERT INTO branch_keys ({_C}) VALUES (?,?,?,?,?,?,?)"  # noqa: S608
                " ON CONFLICT (key, branch, version) DO NOTHING",
                (
                    row.key,
                    row.branch,
                    row.version,
                    row.branch_id,
                    row.wrapped,
                    row.kek_version,
                    row.created_at,
                ),
            )
            stored = _row(
                conn.execute(
                    f"SELECT {_C} FROM branch_keys WHERE key=? AND branch=? AND version=?",  # noqa: S608
                    (row.key, row.branch, row.version),
                ).fetchone()
            )
            if stored is None:  # forgotten between the two statements
                raise StoreError("branch key row vanished during insert", code="store_conflict")
            return stored

        return await self.store.run("branch_keys.insert", insert)

    async def latest(self, key: str, branch: str) -> BranchKeyRow | None:
        def latest(conn: sqlite3.Connection) -> BranchKeyRow | None:
            return _row(
                conn.execute(
                    f"SELECT {_C} FROM branch_keys WHERE key=? AND branch=?"  # noqa: S608
                    " ORDER BY version DESC LIMIT 1",
                    (key, branch),
                ).fetchone()
            )

        return await self.store.run("branch_keys.latest", latest)

    async def get(self, branch_id: str, version: int) -> BranchKeyRow | None:
        def get(conn: sqlite3.Connection) -> BranchKeyRow | None:
            return _row(
                conn.execute(
                    f"SELECT {_C} FROM branch_keys WHERE branch_id=? AND version=?",  # noqa: S608
                    (branch_id, version),
                ).fetchone()
            )

        return await self.store.run("branch_keys.get", get)

    async def versions(self, key: str) -> list[BranchKeyRow]:
        def versions(conn: sqlite3.Connection) -> list[BranchKeyRow]:
            rows = conn.execute(
                f"SELECT {_C} FROM branch_keys WHERE key=? ORDER BY branch, version",  # noqa: S608
                (key,),
            ).fetchall()
            return [r for r in map(_row, rows) if r is not None]

        return await self.store.run("branch_keys.versions", versions)

    async def forget(self, key: str, branch: str) -> int:
        def forget(conn: sqlite3.Connection) -> int:
            cur = conn.execute("DELETE FROM branch_keys WHERE key=? AND branch=?", (key, branch))
            return int(cur.rowcount)

        return await self.store.run("branch_keys.forget", forget)


TABLE = FeatureTable(FEATURE, MIGRATIONS, SqliteBranchKeys)
