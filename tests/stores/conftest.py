"""Fixtures for store tests: ``make_store`` builds a configured store of each backend.

Tests that take ``make_store`` run once on sqlite and once on a real PostgreSQL (a fresh
database per test, on the session's ``postgres`` cluster from tests/conftest.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecrypt import config
from sidecrypt.plugin_manager import build_stores, make_plugin_manager
from sidecrypt.stores import Store

MakeStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_block(
    store_kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """The ``stores.<name>`` config block for this backend (a fresh database or file)."""
    if store_kind == "sqlite":
        return {"type": "sqlite", "path": "store.db"}
    pg = request.getfixturevalue("postgres")
    dsn = pg.create_database(f"t_{uuid.uuid4().hex[:16]}")
    monkeypatch.setenv("SIDECRYPT_TEST_DSN", dsn)
    return {"type": "postgresql", "dsn": {"env": "SIDECRYPT_TEST_DSN"}}


@pytest.fixture
async def make_store(store_block: dict[str, Any], tmp_path: Path) -> AsyncIterator[MakeStore]:
    """``await make_store(migrate=True, start=True, **options)``: a store on the same file or
    database each call (so two calls are two sidecars sharing it); closed at the end."""
    created: list[Store] = []

    async def make(*, migrate: bool = True, start: bool = True, **options: Any) -> Store:
        raw = {
            "upstream": {"url": "http://127.0.0.1:9"},
            "stores": {"main": {**store_block, **options}},
        }
        settings = config.parse(raw, base_dir=tmp_path)
        store = build_stores(settings, make_plugin_manager(entry_points=False))["main"]
        created.append(store)
        if migrate:
            await store.migrate()
        if start:
            await store.start()
        return store

    yield make
    for store in created:
        await store.close()
