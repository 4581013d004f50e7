"""The store contract on every built-in backend (sqlite, and a real PostgreSQL): schema
migration and readiness, the branch key table's race-free inserts and forgetting, and
failures that fail closed with a StoreError that names no secret."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from sidecrypt.crypto.hierarchy import BranchKeyRow, branch_keys
from sidecrypt.stores import Store, StoreError

MakeStore = Callable[..., Awaitable[Store]]


def _row(version: int = 1, *, branch: str = "", branch_id: str | None = None) -> BranchKeyRow:
    return BranchKeyRow(
        key="app",
        branch=branch,
        version=version,
        branch_id=branch_id or uuid.uuid4().hex,
        wrapped=b"\x01wrapped" + bytes([version]),
        kek_version=3,
        created_at=time.time(),
    )


async def test_migrate_creates_schema_once(make_store: MakeStore) -> None:
    store = await make_store(migrate=False, start=False)
    first = await store.migrate()
    assert first["branch_keys"] == (0, 1)
    again = await store.migrate()
    assert again["branch_keys"] == (1, 1)
    await store.start()
    await store.check()
    assert store.describe()["schema"] == {"branch_keys": 1, "token_vault": 1}


async def test_concurrent_migrations_apply_each_step_once(make_store: MakeStore) -> None:
    stores = [await make_store(migrate=False, start=False) for _ in range(4)]
    results = await asyncio.gather(*(s.migrate() for s in stores))
    assert sorted(r["branch_keys"] for r in results) == [(0, 1), (1, 1), (1, 1), (1, 1)]


async def test_unmigrated_schema_is_refused(make_store: MakeStore) -> None:
    store = await make_store(migrate=False, start=False, auto_migrate=False)
    with pytest.raises(StoreError) as info:
        await store.start()
    assert info.value.code == "store_schema"
    assert "sidecrypt store migrate" in info.value.message
    assert info.value.status == 503


async def test_branch_key_rows_round_trip(make_store: MakeStore) -> None:
    table = branch_keys(await make_store())
    assert await table.latest("app", "") is None
    first = _row(1)
    assert await table.insert(first) == first
    second = _row(2, branch_id=first.branch_id)
    await table.insert(second)
    assert await table.latest("app", "") == second
    assert await table.get(first.branch_id, 1) == first
    assert await table.get(first.branch_id, 3) is None
    assert [r.version for r in await table.versions("app")] == [1, 2]
    assert "wrapped" not in repr(first).replace("wrapped=<", "")


async def test_first_version_race_has_one_winner(make_store: MakeStore) -> None:
    """Many sidecars creating version 1 at once all end up with the same stored row."""
    tables = [branch_keys(await make_store()) for _ in range(3)]
    candidates = [_row(1) for _ in range(12)]
    stored = await asyncio.gather(*(tables[i % 3].insert(row) for i, row in enumerate(candidates)))
    assert len({r.branch_id for r in stored}) == 1
    assert stored[0] in candidates
    assert [r.branch_id for r in await tables[0].versions("app")] == [stored[0].branch_id]


async def test_branch_id_and_version_is_unique(make_store: MakeStore) -> None:
    table = branch_keys(await make_store())
    first = await table.insert(_row(1, branch="tenant=a"))
    with pytest.raises(StoreError):
        await table.insert(_row(1, branch="tenant=b", branch_id=first.branch_id))


async def test_forget_deletes_only_that_branch(make_store: MakeStore) -> None:
    table = branch_keys(await make_store())
    acme = await table.insert(_row(1, branch="tenant=acme"))
    await table.insert(_row(2, branch="tenant=acme", branch_id=acme.branch_id))
    other = await table.insert(_row(1, branch="tenant=other"))
    assert await table.forget("app", "tenant=acme") == 2
    assert await table.get(acme.branch_id, 1) is None
    assert await table.latest("app", "tenant=acme") is None
    assert await table.get(other.branch_id, 1) == other
    assert await table.forget("app", "tenant=acme") == 0


async def test_unknown_feature_is_unsupported(make_store: MakeStore) -> None:
    store = await make_store()
    with pytest.raises(StoreError) as info:
        store.table("no_such_feature")
    assert info.value.code == "store_unsupported"


async def test_store_is_a_store(make_store: MakeStore) -> None:
    assert isinstance(await make_store(), Store)


async def test_closed_store_fails_closed(make_store: MakeStore) -> None:
    store = await make_store()
    table = branch_keys(store)
    await store.close()
    with pytest.raises(StoreError):
        await table.latest("app", "")
    with pytest.raises(StoreError):
        await store.check()
