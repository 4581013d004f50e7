"""What differs between the backends: the sqlite file's mode, WAL and thread; the postgresql
DSN as a secret and an unreachable server; and the ``stores:`` config section's errors."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from kms_server import free_port
from sidecrypt import config, hookimpl
from sidecrypt.crypto.hierarchy import branch_keys
from sidecrypt.errors import ConfigError, PluginError
from sidecrypt.plugin_manager import build_stores, make_plugin_manager, store_types
from sidecrypt.stores import Store, StoreError, StoreOptions


def _stores(blocks: dict[str, Any], base: Path) -> dict[str, Store]:
    raw = {"upstream": {"url": "http://127.0.0.1:9"}, "stores": blocks}
    settings = config.parse(raw, file="s.yaml", base_dir=base)
    return build_stores(settings, make_plugin_manager(entry_points=False))


# -- sqlite ------------------------------------------------------------------------------------


async def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    store = _stores({"main": {"type": "sqlite", "path": "db/s.db"}}, tmp_path)["main"]
    (tmp_path / "db").mkdir()
    old = os.umask(0o022)
    try:
        await store.start()
    finally:
        os.umask(old)
    try:
        await branch_keys(store).latest("app", "")
        for name in ("s.db", "s.db-wal", "s.db-shm"):
            path = tmp_path / "db" / name
            assert path.exists(), name
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name

        def mode(conn: Any) -> str:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

        assert await store.run("test", mode) == "wal"  # type: ignore[attr-defined]
    finally:
        await store.close()


async def test_sqlite_refuses_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    store = _stores({"main": {"type": "sqlite", "path": str(path)}}, tmp_path)["main"]
    try:
        with pytest.raises(StoreError) as info:
            await store.start()
        assert "chmod 600" in info.value.message
    finally:
        await store.close()


async def test_sqlite_queries_run_off_the_event_loop(tmp_path: Path) -> None:
    store = _stores({"main": {"type": "sqlite", "path": "s.db"}}, tmp_path)["main"]
    await store.start()
    try:

        def where(conn: Any) -> int:
            return threading.get_ident()

        thread = await store.run("test", where)  # type: ignore[attr-defined]
        assert thread != threading.get_ident()
    finally:
        await store.close()


# -- postgresql --------------------------------------------------------------------------------


async def test_postgresql_unreachable_fails_closed_without_the_dsn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_DSN", f"postgresql://u:CANARY-PW@127.0.0.1:{free_port()}/db")
    store = _stores(
        {"main": {"type": "postgresql", "dsn": {"env": "PG_DSN"}, "timeout": 2}}, tmp_path
    )["main"]
    with pytest.raises(StoreError) as info:
        await asyncio.wait_for(store.start(), 30)
    assert info.value.code == "store_unavailable"
    assert "CANARY" not in info.value.message
    assert "CANARY" not in repr(info.value.__cause__)
    await store.close()


async def test_postgresql_dsn_from_a_file(
    tmp_path: Path, postgres: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dsn").write_text(postgres.dsn() + "\n")
    store = _stores(
        {"main": {"type": "postgresql", "dsn": {"file": "dsn"}, "auto_migrate": True}}, tmp_path
    )["main"]
    try:
        await store.start()
        await store.check()
        assert "CANARY" not in repr(store)
        assert postgres.password not in str(store.describe())
    finally:
        await store.close()


async def test_postgresql_down_then_back(tmp_path: Path, postgres: Any) -> None:
    """A store whose server went away answers StoreError, not a hang or a crash."""
    import asyncpg

    dsn = postgres.create_database("downtest")
    os.environ["PG_DOWN_DSN"] = dsn
    try:
        store = _stores(
            {"main": {"type": "postgresql", "dsn": {"env": "PG_DOWN_DSN"}, "auto_migrate": True}},
            tmp_path,
        )["main"]
        await store.start()
        conn = await asyncpg.connect(postgres.dsn())
        try:  # kill the store's connections from the outside
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = 'downtest' AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        failed = 0
        for _ in range(3):  # a terminated pooled connection fails once, then reconnects
            try:
                await branch_keys(store).latest("app", "")
            except StoreError:
                failed += 1
        assert failed <= 1
        await store.close()
    finally:
        del os.environ["PG_DOWN_DSN"]


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "path", "message"),
    [
        ({"path": "x.db"}, "stores.main.type", "missing type"),
        ({"type": "redis"}, "stores.main.type", "unknown store type 'redis'"),
        ({"type": "sqlite"}, "stores.main.path", "Field required"),
        ({"type": "sqlite", "path": "x", "color": 1}, "stores.main.color", "Extra inputs"),
        (
            {"type": "postgresql", "dsn": "postgresql://u:CANARY@h/db"},
            "stores.main.dsn",
            "never inline",
        ),
        (
            {"type": "postgresql", "dsn": {"env": "A", "file": "b"}},
            "stores.main.dsn",
            "exactly one",
        ),
    ],
)
def test_bad_store_config_names_file_and_path(
    tmp_path: Path, block: dict[str, Any], path: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _stores({"main": block}, tmp_path)
    assert info.value.message.startswith(f"s.yaml: {path}: "), info.value.message
    assert message in info.value.message
    assert "CANARY" not in info.value.message


# -- the hook ----------------------------------------------------------------------------------


class _MemoryStore:
    """A third party's store type: no tables, just enough to be picked by the config."""

    type_name = "memory"
    options_model = StoreOptions

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> _MemoryStore:
        return cls(name)


def test_third_party_store_types_join_through_the_hook(tmp_path: Path) -> None:
    class Plugin:
        @hookimpl
        def sidecrypt_store_types(self) -> list[type[Any]]:
            return [_MemoryStore]

    settings = config.parse(
        {"upstream": {"url": "http://127.0.0.1:9"}, "stores": {"m": {"type": "memory"}}},
        base_dir=tmp_path,
    )
    pm = make_plugin_manager([Plugin()], entry_points=False)
    assert {"sqlite", "postgresql", "memory"} <= set(store_types(pm))
    assert isinstance(build_stores(settings, pm)["m"], _MemoryStore)

    class Clash:
        @hookimpl
        def sidecrypt_store_types(self) -> list[type[Any]]:
            return [type("Other", (_MemoryStore,), {"type_name": "sqlite"})]

    with pytest.raises(PluginError, match="'sqlite' is offered by two plugins"):
        store_types(make_plugin_manager([Clash()], entry_points=False))
