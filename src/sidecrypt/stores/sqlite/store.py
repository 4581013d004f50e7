"""The ``sqlite`` store: one embedded file, WAL, mode 0600, queried off the event loop.

Config: ``stores.<name>: {type: sqlite, path: FILE}`` (relative to the config file's
directory), optional ``busy_timeout`` (seconds a writer waits for another process's lock) and
``auto_migrate`` (default true: an embedded file needs no separate step; false makes
``start()`` refuse a schema that ``sidecrypt store migrate`` has not brought up to date).

Every query runs on one dedicated thread that owns the connection (stdlib ``sqlite3`` is
blocking), so the event loop never waits on disk. Several processes (``server.workers``, the
CLI) may share the file: WAL lets readers run beside the one writer, and ``BEGIN IMMEDIATE``
serialises writers, with ``busy_timeout`` to wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import stat
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, ValidationInfo, field_validator

from ..base import FeatureTable, StoreError, StoreOptions, pending, schema_problem, unsupported
from .features import FEATURES

T = TypeVar("T")

_SCHEMA_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " feature TEXT PRIMARY KEY, version INTEGER NOT NULL, applied_at REAL NOT NULL)"
)


class SqliteOptions(StoreOptions):
    type: Literal["sqlite"] = "sqlite"
    path: Path
    busy_timeout: float = Field(5.0, gt=0, le=300)
    auto_migrate: bool = True

    @field_validator("path")
    @classmethod
    def _relative(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        return value if value.is_absolute() or base is None else Path(base) / value


class SqliteStore:
    """One SQLite file; a single worker thread owns its connection."""

    type_name: ClassVar[str] = "sqlite"
    options_model: ClassVar[type[StoreOptions]] = SqliteOptions
    features: ClassVar[dict[str, FeatureTable]] = FEATURES

    def __init__(self, name: str, options: SqliteOptions) -> None:
        self.name = name
        self.options = options
        self.path = options.path
        self.calls: Counter[tuple[str, str]] = Counter()  # (operation, outcome) -> count
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._tables: dict[str, Any] = {}
        self._applied: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"SqliteStore({self.name!r}, path={str(self.path)!r})"

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> SqliteStore:
        if not isinstance(options, SqliteOptions):
            options = SqliteOptions.model_validate(options, context={"base_dir": base_dir})
        elif not options.path.is_absolute():
            options = options.model_copy(update={"path": base_dir / options.path})
        return cls(name, options)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tables:  # started already (a store shared by several keys)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                1, thread_name_prefix=f"sidecrypt-store-{self.name}"
            )
        await self.run("open", self._open)
        if self.options.auto_migrate:
            await self.migrate()
        else:
            await self._require_current()
        self._tables = {name: f.factory(self) for name, f in self.features.items()}

    def _open(self, _: None) -> None:
        path = self.path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"store {self.name!r}: cannot open {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"store {self.name!r}: {path} is not a regular file")
        if st.st_mode & 0o077:
            raise StoreError(
                f"store {self.name!r}: {path} has mode {stat.S_IMODE(st.st_mode):04o}: "
                f"group/others may read it; refusing it (run: chmod 600 {path})"
            )
        conn = sqlite3.connect(
            path, timeout=self.options.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA secure_delete=ON")  # forgotten rows are overwritten on disk
            conn.execute(f"PRAGMA busy_timeout={int(self.options.busy_timeout * 1000)}")
            for suffix in ("-wal", "-shm"):
                side = Path(f"{path}{suffix}")
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(side, 0o600)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._conn is not None:
            with contextlib.suppress(StoreError):
                await self.run("close", self._close)
        self._executor.shutdown(wait=True)
        self._executor = None
        self._tables = {}

    def _close(self, conn: sqlite3.Connection) -> None:
        conn.close()
        self._conn = None

    # -- running queries --------------------------------------------------------------------

    async def run(self, op: str, fn: Callable[[Any], T], *args: Any) -> T:
        """Run ``fn(connection, *args)`` on the store's thread; sqlite errors become
        StoreError (the message names the operation only)."""
        if self._executor is None:
            raise StoreError(f"store {self.name!r}: not started")
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(
                self._executor, functools.partial(self._call, fn, *args)
            )
        except StoreError:
            self.calls[(op, "error")] += 1
            raise
        except sqlite3.Error as exc:
            self.calls[(op, "error")] += 1
            raise StoreError(f"store {self.name!r}: {op} failed ({type(exc).__name__})") from exc
        self.calls[(op, "ok")] += 1
        return result

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if fn == self._open:
            return fn(None, *args)
        if self._conn is None:
            raise StoreError(f"store {self.name!r}: not open")
        return fn(self._conn, *args)

    # -- schema -----------------------------------------------------------------------------

    async def migrate(self) -> dict[str, tuple[int, int]]:
        if self._conn is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    1, thread_name_prefix=f"sidecrypt-store-{self.name}"
                )
            await self.run("open", self._open)
        done = await self.run("migrate", self._migrate)
        self._applied = {name: after for name, (_, after) in done.items()}
        return done

    def _migrate(self, conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
        conn.execute("BEGIN IMMEDIATE")  # one migrating process at a time
        try:
            conn.execute(_SCHEMA_TABLE)
            applied = _applied(conn)
            out = {name: (applied.get(name, 0),) * 2 for name in self.features}
            for name, steps in pending(self.features, applied).items():
                for step in steps:
                    for statement in step.statements:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version (feature, version, applied_at) VALUES (?,?,?)"
                        " ON CONFLICT (feature) DO UPDATE SET version = excluded.version,"
                        " applied_at = excluded.applied_at",
                        (name, step.version, time.time()),
                    )
                out[name] = (out[name][0], steps[-1].version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    async def _require_current(self) -> None:
        self._applied = await self.run("schema", _applied_or_empty)
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
        return {
            "name": self.name,
            "type": self.type_name,
            "path": str(self.path),
            "schema": dict(self._applied),
        }


def _applied(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT feature, version FROM schema_version").fetchall()
    return {str(feature): int(version) for feature, version in rows}


def _applied_or_empty(conn: sqlite3.Connection) -> dict[str, int]:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    return _applied(conn) if found else {}
