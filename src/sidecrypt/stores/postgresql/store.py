"""The ``postgresql`` store: many sidecars on many hosts share one database (asyncpg pool).

Config: ``stores.<name>: {type: postgresql, dsn: {env: VAR} | {file: PATH}}`` (the DSN holds a
password, so it is a secret: never inline), optional ``min_connections``/``max_connections``,
``timeout`` (seconds for a connection or a query) and ``auto_migrate`` (default false: the
schema of a shared database is migrated by ``sidecrypt store migrate``, and ``start()``
refuses a schema that is not current). Migrations take a transaction-scoped advisory lock, so
several hosts migrating at once apply each step exactly once. Needs ``pip install
'sidecrypt[postgresql]'``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import asyncpg
from pydantic import Field, ValidationInfo, field_validator

from ...config import SecretRef
from ..base import FeatureTable, StoreError, StoreOptions, pending, schema_problem, unsupported
from .features import FEATURES

T = TypeVar("T")

_MIGRATE_LOCK = 0x5C_51DE  # pg_advisory_xact_lock id: one migrator at a time
_SCHEMA_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " feature TEXT PRIMARY KEY, version INTEGER NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)


# What a broken or terminated connection can raise. asyncpg's InternalClientError is not an
# InterfaceError: a backend killed mid-query can surface as "cannot switch to state ...".
_DB_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


class PostgresOptions(StoreOptions):
    type: Literal["postgresql"] = "postgresql"
    dsn: SecretRef
    min_connections: int = Field(1, ge=0, le=100)
    max_connections: int = Field(10, ge=1, le=1000)
    timeout: float = Field(5.0, gt=0, le=300)
    auto_migrate: bool = False

    @field_validator("dsn", mode="before")
    @classmethod
    def _not_inline(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("the DSN is a secret: {env: NAME} or {file: PATH}, never inline")
        return value

    @field_validator("dsn")
    @classmethod
    def _relative_file(cls, value: SecretRef, info: ValidationInfo) -> SecretRef:
        base = (info.context or {}).get("base_dir")
        if value.file is not None and not value.file.is_absolute() and base is not None:
            return value.model_copy(update={"file": Path(base) / value.file})
        return value


class PostgresStore:
    """An asyncpg pool; each feature's table object runs its queries through :meth:`run`."""

    type_name: ClassVar[str] = "postgresql"
    options_model: ClassVar[type[StoreOptions]] = PostgresOptions
    features: ClassVar[dict[str, FeatureTable]] = FEATURES

    def __init__(self, name: str, options: PostgresOptions) -> None:
        self.name = name
        self.options = options
        self.calls: Counter[tuple[str, str]] = Counter()
        self._pool: asyncpg.Pool | None = None
        self._tables: dict[str, Any] = {}
        self._applied: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"PostgresStore({self.name!r})"

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> PostgresStore:
        if not isinstance(options, PostgresOptions):
            options = PostgresOptions.model_validate(options, context={"base_dir": base_dir})
        return cls(name, options)

    # -- lifecycle --------------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        dsn = self.options.dsn.resolve().decode()
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min(self.options.min_connections, self.options.max_connections),
                max_size=self.options.max_connections,
                timeout=self.options.timeout,
                command_timeout=self.options.timeout,
            )
        except _DB_ERRORS as exc:
            self.calls[("connect", "error")] += 1
            # asyncpg's messages may quote the DSN: name the failure's type only.
            raise StoreError(
                f"store {self.name!r}: cannot connect ({type(exc).__name__})"
            ) from None
        except ValueError:
            raise StoreError(f"store {self.name!r}: the DSN does not parse") from None
        self.calls[("connect", "ok")] += 1
        self._pool = pool
        return pool

    async def start(self) -> None:
        if self._tables:  # started already (a store shared by several keys)
            return
        await self._connect()
        if self.options.auto_migrate:
            await self.migrate()
        else:
            await self._require_current()
        self._tables = {name: f.factory(self) for name, f in self.features.items()}

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._tables = {}
        if pool is not None:
            try:
                await pool.close()
            except Exception:
                pool.terminate()

    # -- running queries --------------------------------------------------------------------

    async def run(self, op: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``fn(connection)`` on a pooled connection; database errors become StoreError."""
        pool = self._pool
        if pool is None:
            raise StoreError(f"store {self.name!r}: not started")
        try:
            async with pool.acquire(timeout=self.options.timeout) as conn:
                result = await fn(conn)
        except StoreError:
            self.calls[(op, "error")] += 1
            raise
        except _DB_ERRORS as exc:
            self.calls[(op, "error")] += 1
            code = getattr(exc, "sqlstate", None)
            detail = type(exc).__name__ + (f" {code}" if code else "")
            raise StoreError(f"store {self.name!r}: {op} failed ({detail})") from exc
        self.calls[(op, "ok")] += 1
        return result

    # -- schema -----------------------------------------------------------------------------

    async def migrate(self) -> dict[str, tuple[int, int]]:
        await self._connect()

        async def migrate(conn: asyncpg.Connection) -> dict[str, tuple[int, int]]:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
                await conn.execute(_SCHEMA_TABLE)
                applied = await _applied(conn)
                out = {name: (applied.get(name, 0),) * 2 for name in self.features}
                for name, steps in pending(self.features, applied).items():
                    for step in steps:
                        for statement in step.statements:
                            await conn.execute(statement)
                        await conn.execute(
                            "INSERT INTO schema_version (feature, version, applied_at)"
                            " VALUES ($1, $2, $3) ON CONFLICT (feature) DO UPDATE"
                            " SET version = excluded.version, applied_at = excluded.applied_at",
                            name,
                            step.version,
                            time.time(),
                        )
                    out[name] = (out[name][0], steps[-1].version)
                return out

        done = await self.run("migrate", migrate)
        self._applied = {name: after for name, (_, after) in done.items()}
        return done

    async def _require_current(self) -> None:
        async def read(conn: asyncpg.Connection) -> dict[str, int]:
            exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
            return await _applied(conn) if exists else {}

        self._applied = await self.run("schema", read)
        problem = schema_problem(self.features, self._applied)
        if problem is not None:
            raise StoreError(f"store {self.name!r}: {problem}", code="store_schema")

    async def check(self) -> None:
        await self._require_current()

    # -- tables -----------------------------------------------------------------------------

    def table(self, feature: str) -> Any:
        try:
            return self._tables[feature]
        except KeyError:
            if feature in self.features:
                raise StoreError(f"store {self.name!r}: not started") from None
            raise unsupported(self.name, self.type_name, feature) from None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name, "schema": dict(self._applied)}


async def _applied(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT feature, version FROM schema_version")
    return {str(r["feature"]): int(r["version"]) for r in rows}
