"""Branch keys (crypto/hierarchy) on sqlite and a real PostgreSQL, with the real local
provider underneath: one provider call per branch key version whatever the number of data
keys, race-free first version shared by several sidecars, rotation (on demand and on
schedule) seen by every sidecar within ``refresh``, per-tenant branches and forgetting, old
tokens still decrypting, and no plaintext key material in the store."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecrypt import config, keyring
from sidecrypt.crypto.hierarchy import branch_keys
from sidecrypt.crypto.hierarchy.provider import HierarchicalProvider
from sidecrypt.errors import ConfigError, CryptoError, RequestError
from sidecrypt.keys import CacheLimits, DataKeyService, canonical_context
from sidecrypt.plugin_manager import build_providers, build_stores, make_plugin_manager
from sidecrypt.proxy.fields import FieldCrypto

ACME = canonical_context({"tenant": "acme"})
OTHER = canonical_context({"tenant": "other"})


class Sidecar:
    """One process's worth: its own store connection, providers and data key service."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        pm = make_plugin_manager(entry_points=False)
        self.stores = build_stores(settings, pm)
        self.providers = build_providers(settings, pm, self.stores)
        self.keys = DataKeyService(self.providers, CacheLimits(max_uses=1))
        self.crypto = FieldCrypto(self.keys)
        self.calls: Counter[str] = Counter()
        self.material: list[bytes] = []  # branch key plaintexts the provider handed out
        for provider in self.providers.values():
            inner = getattr(provider, "legacy", provider)
            for op in ("generate_data_key", "decrypt_data_key"):
                self._count(inner, op)

    def _count(self, inner: Any, op: str) -> None:
        real = getattr(inner, op)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[op] += 1
            out = await real(*args, **kwargs)
            self.material.append(out.plaintext if op == "generate_data_key" else out)
            return out

        setattr(inner, op, counted)

    def hier(self, name: str = "app") -> HierarchicalProvider:
        provider = self.providers[name]
        assert isinstance(provider, HierarchicalProvider)
        return provider

    async def start(self) -> Sidecar:
        for store in self.stores.values():
            await store.migrate()
            await store.start()
        for provider in self.providers.values():
            await provider.start()
        return self

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()
        for store in self.stores.values():
            await store.close()

    async def encrypt(self, value: Any, context: Any = ACME, key: str = "app") -> str:
        from sidecrypt.proxy.routes import adhoc_route

        route = adhoc_route(key, ["$.v"], context=dict(context))
        body, _ = await self.crypto.encrypt_body(
            json.dumps({"v": value}).encode(), route, route.request_encrypt, context
        )
        return str(json.loads(body)["v"])

    async def decrypt(self, token: str, context: Any = ACME, key: str = "app") -> Any:
        from sidecrypt.proxy.routes import adhoc_route

        route = adhoc_route(key, ["$.v"], context=dict(context))
        return await self.crypto.open_token(token, route, context, "$.v")


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def sidecar(store_block: dict[str, Any], tmp_path: Path) -> AsyncIterator[SidecarFactory]:
    ring = tmp_path / "keyring.json"
    keyring.create_key(ring, "app")
    keyring.create_key(ring, "plain")
    made: list[Sidecar] = []

    async def make(
        hierarchy: dict[str, Any] | None = None, *, with_hierarchy: bool = True
    ) -> Sidecar:
        app: dict[str, Any] = {"provider": "local", "keyring": str(ring)}
        if with_hierarchy:
            app["hierarchy"] = {"store": "main", "refresh": 0.2, **(hierarchy or {})}
        raw = {
            "upstream": {"url": "http://127.0.0.1:9"},
            "stores": {"main": store_block},
            "keys": {"app": app},
        }
        one = Sidecar(config.parse(raw, base_dir=tmp_path))
        made.append(one)
        return await one.start()

    yield make
    for one in made:
        await one.close()


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_one_provider_call_per_branch_version(sidecar: SidecarFactory) -> None:
    writer = await sidecar()
    tokens = [await writer.encrypt(f"value-{i}") for i in range(50)]
    assert len({t[:120] for t in tokens}) > 1  # max_uses 1: fifty distinct data keys
    assert writer.calls == {"generate_data_key": 1}  # the branch key, nothing else
    reader = await sidecar()  # another sidecar, cold
    values = await asyncio.gather(*(reader.decrypt(t) for t in tokens))
    assert values == [f"value-{i}" for i in range(50)]
    assert reader.calls == {"decrypt_data_key": 1}


async def test_first_version_race_and_agreement(sidecar: SidecarFactory) -> None:
    cars = [await sidecar() for _ in range(4)]
    rows = await asyncio.gather(*(c.hier().active("tenant=acme") for c in cars))
    assert len({(r.branch_id, r.version) for r in rows}) == 1
    tokens = await asyncio.gather(*(c.encrypt("x") for c in cars))
    for car in cars:
        for token in tokens:
            assert await car.decrypt(token) == "x"


async def test_rotation_reaches_every_sidecar_and_old_versions_decrypt(
    sidecar: SidecarFactory,
) -> None:
    a, b = await sidecar(), await sidecar()
    old = await a.encrypt("before")
    first = await b.hier().active("")
    rotated = await a.hier().rotate("")
    assert rotated.version == first.version + 1
    assert rotated.branch_id == first.branch_id

    async def b_sees_it() -> bool:
        return (await b.hier().active("")).version == rotated.version

    await _eventually(b_sees_it)
    new = await b.encrypt("after")
    assert await a.decrypt(new) == "after"
    assert await b.decrypt(old) == "before"


async def test_scheduled_rotation_creates_one_new_version(sidecar: SidecarFactory) -> None:
    cars = [await sidecar({"rotate_every": "30d"}) for _ in range(3)]
    first = await cars[0].hier().active("")
    for car in cars:  # a month later, for everyone at once
        car.hier()._wall = lambda: time.time() + 31 * 86400
        car.hier()._active.clear()
    rows = await asyncio.gather(*(c.hier().active("") for c in cars))
    assert {r.version for r in rows} == {first.version + 1}
    assert [r.version for r in await branch_keys(cars[0].stores["main"]).versions("app")] == [1, 2]


async def test_tenant_branches_are_isolated_and_forgettable(sidecar: SidecarFactory) -> None:
    car = await sidecar({"per": "tenant"})
    acme = await car.encrypt("acme-secret", ACME)
    other = await car.encrypt("other-secret", OTHER)
    rows = await branch_keys(car.stores["main"]).versions("app")
    assert sorted(r.branch for r in rows) == ["tenant=acme", "tenant=other"]
    assert len({r.branch_id for r in rows}) == 2
    with pytest.raises(CryptoError):
        await car.decrypt(acme, OTHER)
    with pytest.raises(RequestError) as info:
        await car.encrypt("x", canonical_context({}))
    assert info.value.code == "context_missing"

    reader = await sidecar({"per": "tenant"})
    assert await reader.decrypt(acme) == "acme-secret"  # warm in another sidecar
    assert await branch_keys(car.stores["main"]).forget("app", "tenant=acme") == 1

    async def forgotten() -> bool:
        try:
            await reader.decrypt(acme)
        except CryptoError:
            return True
        return False

    await _eventually(forgotten)  # within refresh (+ the data key cache, bounded by it)
    assert await reader.decrypt(other, OTHER) == "other-secret"
    fresh = await sidecar({"per": "tenant"})
    with pytest.raises(CryptoError):
        await fresh.decrypt(acme)
    again = await fresh.encrypt("new-acme", ACME)  # a new lineage for the tenant
    assert await fresh.decrypt(again) == "new-acme"


async def test_tokens_from_before_the_hierarchy_still_decrypt(sidecar: SidecarFactory) -> None:
    before = await sidecar(with_hierarchy=False)
    old = await before.encrypt("legacy")
    assert old.startswith("sc1.")
    after = await sidecar()
    assert await after.decrypt(old) == "legacy"
    new = await after.encrypt("branched")
    assert await after.decrypt(new) == "branched"
    with pytest.raises(CryptoError):
        await before.decrypt(new)  # a provider without the hierarchy cannot read it


async def test_store_holds_no_key_material(sidecar: SidecarFactory, tmp_path: Path) -> None:
    car = await sidecar()
    await car.encrypt("x")
    (material,) = car.material
    (row,) = await branch_keys(car.stores["main"]).versions("app")
    assert material not in row.wrapped
    assert "wrapped=<" in repr(row)
    assert material.hex() not in repr(car.hier()._keys) + repr(car.hier())
    db = tmp_path / "store.db"
    if db.exists():
        for path in tmp_path.glob("store.db*"):
            assert material not in path.read_bytes()


def test_hierarchy_config_errors_name_the_path(tmp_path: Path) -> None:
    base = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "stores": {"main": {"type": "sqlite", "path": "s.db"}},
    }
    ring = tmp_path / "k.json"
    keyring.create_key(ring, "app")

    def build(hierarchy: Any) -> None:
        raw = {
            **base,
            "keys": {"app": {"provider": "local", "keyring": str(ring), "hierarchy": hierarchy}},
        }
        settings = config.parse(raw, file="c.yaml", base_dir=tmp_path)
        build_providers(settings, make_plugin_manager(entry_points=False))

    with pytest.raises(ConfigError, match=r"c.yaml: keys.app.hierarchy.store: no store named 'x'"):
        build({"store": "x"})
    with pytest.raises(ConfigError, match=r"keys.app.hierarchy.rotate_every: .*duration"):
        build({"store": "main", "rotate_every": "3 fortnights"})
    with pytest.raises(ConfigError, match=r"keys.app.hierarchy.rotate_every: .*at least 60"):
        build({"store": "main", "rotate_every": 5})
    with pytest.raises(ConfigError, match=r"keys.app.hierarchy.colour: Extra inputs"):
        build({"store": "main", "colour": "red"})


async def test_store_outage_keeps_cached_branch_keys_serving(sidecar: SidecarFactory) -> None:
    from sidecrypt.stores import StoreError

    car = await sidecar()
    token = await car.encrypt("kept")
    await car.stores["main"].close()  # the store is gone from here on
    car.keys.clear()  # no data key cached: the branch key must do
    await asyncio.sleep(0.3)  # past refresh: revalidation fails, the cached version serves
    assert await car.decrypt(token) == "kept"
    assert await car.decrypt(await car.encrypt("new")) == "new"
    assert car.hier().branch_stats["stale_active"] >= 1
    cold = await sidecar()
    await cold.stores["main"].close()
    with pytest.raises(StoreError) as info:
        await cold.decrypt(token)
    assert info.value.status == 503 and info.value.retry_after > 0


async def test_rewrap_moves_old_tokens_under_the_hierarchy(sidecar: SidecarFactory) -> None:
    from sidecrypt import envelope, offline

    before = await sidecar(with_hierarchy=False)
    old = [await before.encrypt(f"v{i}") for i in range(3)]
    after = await sidecar()
    new = []
    for token in old:
        doc = json.dumps({"v": token}).encode()
        out, moved = await offline.rewrap_document(
            after.settings, doc, selectors=("$.v",), to_key="app"
        )
        assert [m[1:] for m in moved] == [("app", 1)]  # what protected it before
        new.append(json.loads(out)["v"])
    assert {envelope.parse(t).provider for t in new} == {"local.bk"}
    assert [await after.decrypt(t) for t in new] == ["v0", "v1", "v2"]


async def test_branch_caches_are_bounded(
    sidecar: SidecarFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecrypt.crypto.hierarchy import provider as module

    monkeypatch.setattr(module, "MAX_CACHED", 3)
    car = await sidecar({"per": "tenant"})
    tokens = {t: await car.encrypt(t, canonical_context({"tenant": t})) for t in "abcde"}
    assert len(car.hier()._keys) == 3 and len(car.hier()._active) == 3
    car.keys.clear()
    for tenant, token in tokens.items():  # evicted ones come back from the store
        assert await car.decrypt(token, canonical_context({"tenant": tenant})) == tenant
