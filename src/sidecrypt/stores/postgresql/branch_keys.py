"""The key hierarchy's branch key table on PostgreSQL (protocol: crypto.hierarchy.BranchKeyTable).

``forget`` deletes the rows; PostgreSQL keeps dead tuples until VACUUM, so an erasure request
is complete once autovacuum (or ``VACUUM branch_keys``) has run (docs/operations.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg

from ...crypto.hierarchy.table import FEATURE, BranchKeyRow
from ..base import FeatureTable, Migration, StoreError

if TYPE_CHECKING:
    from .store import PostgresStore

MIGRATIONS = (
    Migration(
        1,
        (
            "CREATE TABLE branch_keys ("
            " key TEXT NOT NULL, branch TEXT NOT NULL, version INTEGER NOT NULL,"
            " branch_id TEXT NOT NULL, wrapped BYTEA NOT NULL, kek_version INTEGER NOT NULL,"
            " created_at DOUBLE PRECISION NOT NULL,"
            " PRIMARY KEY (key, branch, version), UNIQUE (branch_id, version))",
        ),
        "branch key versions, stored wrapped",
    ),
)


def _row(found: Any) -> BranchKeyRow | None:
    if found is None:
        return None
    return BranchKeyRow(
        str(found["key"]),
        str(found["branch"]),
        int(found["version"]),
        str(found["branch_id"]),
        bytes(found["wrapped"]),
        int(found["kek_version"]),
        float(found["created_at"]),
    )


# Column list: a constant, so the f-string queries below hold no input (hence noqa S608).
_C = "key, branch, version, branch_id, wrapped, kek_version, created_at"


class PostgresBranchKeys:
    """One statement per call; the insert is an upsert that returns the winning row."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    async def insert(self, row: BranchKeyRow) -> BranchKeyRow:
        async def insert(conn: asyncpg.Connection) -> BranchKeyRow:
            # DO NOTHING returns no row when another writer won; the CTE then reads theirs
            # (same statement, so no window between the two).
            found = await conn.fetchrow(
                f"WITH ins AS (INSERT INTO branch_keys ({_C})"  # noqa: S608
                " VALUES ($1,$2,$3,$4,$5,$6,$7)"
                f" ON CONFLICT (key, branch, version) DO NOTHING RETURNING {_C})"
                f" SELECT {_C} FROM ins UNION ALL"
                f" SELECT {_C} FROM branch_keys WHERE key=$1 AND branch=$2 AND version=$3"
                " LIMIT 1",
                row.key,
                row.branch,
                row.version,
                row.branch_id,
                row.wrapped,
                row.kek_version,
                row.created_at,
            )
            stored = _row(found)
            if stored is None:  # the winner's row is not visible yet: read it again
                stored = _row(
                    await conn.fetchrow(
                        f"SELECT {_C} FROM branch_keys"  # noqa: S608
                        " WHERE key=$1 AND branch=$2 AND version=$3",
                        row.key,
                        row.branch,
                        row.version,
                    )
                )
            if stored is None:
                raise StoreError("branch key row vanished during insert", code="store_conflict")
            return stored

        return await self.store.run("branch_keys.insert", insert)

    async def latest(self, key: str, branch: str) -> BranchKeyRow | None:
        async def latest(conn: asyncpg.Connection) -> BranchKeyRow | None:
            return _row(
                await conn.fetchrow(
                    f"SELECT {_C} FROM branch_keys WHERE key=$1 AND branch=$2"  # noqa: S608
                    " ORDER BY version DESC LIMIT 1",
                    key,
                    branch,
                )
            )

        return await self.store.run("branch_keys.latest", latest)

    async def get(self, branch_id: str, version: int) -> BranchKeyRow | None:
        async def get(conn: asyncpg.Connection) -> BranchKeyRow | None:
            return _row(
                await conn.fetchrow(
                    f"SELECT {_C} FROM branch_keys WHERE branch_id=$1 AND version=$2",  # noqa: S608
                    branch_id,
                    version,
                )
            )

        return await self.store.run("branch_keys.get", get)

    async def versions(self, key: str) -> list[BranchKeyRow]:
        async def versions(conn: asyncpg.Connection) -> list[BranchKeyRow]:
            rows = await conn.fetch(
                f"SELECT {_C} FROM branch_keys WHERE key=$1 ORDER BY branch, version",  # noqa: S608
                key,
            )
            return [r for r in map(_row, rows) if r is not None]

        return await self.store.run("branch_keys.versions", versions)

    async def forget(self, key: str, branch: str) -> int:
        async def forget(conn: asyncpg.Connection) -> int:
            status = await conn.execute(
                "DELETE FROM branch_keys WHERE key=$1 AND branch=$2", key, branch
            )
            return int(str(status).rsplit(" ", 1)[-1])

        return await self.store.run("branch_keys.forget", forget)


TABLE = FeatureTable(FEATURE, MIGRATIONS, PostgresBranchKeys)
