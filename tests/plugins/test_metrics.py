"""Prometheus metrics: a registry per app, counters that move, labels that never carry values."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecrypt import appkeys, config
from sidecrypt.errors import SidecryptError
from sidecrypt.events import AuditEvent
from sidecrypt.keyring import create_key
from sidecrypt.keys import DataKeyService, canonical_context
from sidecrypt.plugin_manager import make_plugin_manager
from sidecrypt.plugins import audit, metrics
from sidecrypt.plugins.local_keys import LocalKeyProvider

CANARY = "CANARY-7f3a9e"
ROUTE = "POST /users/**"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def make_app(tmp_path: Path, audit_block: Mapping[str, Any] | None = None) -> web.Application:
    ring = tmp_path / "keyring.json"
    if not ring.exists():
        create_key(ring, "app")
    provider = LocalKeyProvider.create(
        "app", {"provider": "local", "keyring": str(ring), "reload_interval": 0}, base_dir=tmp_path
    )
    await provider.start()
    settings = config.parse({"upstream": {"url": "http://127.0.0.1:9"}, "audit": audit_block or {}})
    pm = make_plugin_manager([metrics, audit], builtins=False, entry_points=False)
    keys = DataKeyService(
        {"app": provider}, audit=lambda event: pm.hook.sidecrypt_audit(event=event)
    )
    observers: list[appkeys.RequestObserver] = []

    @web.middleware
    async def observe(request: web.Request, handler: Any) -> web.StreamResponse:
        """What Proxy.handle does for request observers."""
        started = time.perf_counter()
        status = 500
        try:
            response: web.StreamResponse = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            for fn in observers:
                fn(request, status, time.perf_counter() - started)

    app = web.Application(middlewares=[observe])
    app[appkeys.REQUEST_OBSERVERS] = observers
    app[appkeys.PLUGIN_MANAGER] = pm
    app[appkeys.KEYS] = keys
    app[appkeys.ADMIN] = web.Application()

    async def users(request: web.Request) -> web.Response:
        """What the proxy does on a matched route, reduced to its key uses and events."""
        request[appkeys.ROUTE] = ROUTE
        context = canonical_context({"tenant": request.headers.get("X-Tenant", "")})
        await keys.for_encrypt("app", context, 16)
        pm.hook.sidecrypt_audit(
            event=AuditEvent(
                "encrypt_fields",
                key="app",
                provider="local",
                context=dict(context),
                fields=("$.ssn", "$.card.number"),
                count=2,
                route=ROUTE,
            )
        )
        if request.query.get("bad"):
            try:
                await keys.for_decrypt("app", b"\x00" * 60, 1, context)
            except SidecryptError as exc:
                return web.json_response(exc.to_json(), status=exc.status)
        request[appkeys.UPSTREAM_SECONDS] = 0.003
        return web.json_response({"ok": True})

    app.router.add_post("/users/{id}", users)
    pm.hook.sidecrypt_app(app=app, settings=settings)
    return app


async def scrape(aiohttp_client: Any, app: web.Application) -> tuple[str, Samples]:
    admin = await aiohttp_client(app[appkeys.ADMIN])
    resp = await admin.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    return text, parse(text)


async def test_counters_move_and_parse(tmp_path: Path, aiohttp_client: Any) -> None:
    app = await make_app(tmp_path)
    client = await aiohttp_client(app)
    for _ in range(3):
        resp = await client.post("/users/1", headers={"X-Tenant": CANARY}, json={"ssn": CANARY})
        assert resp.status == 200
    assert (await client.get("/nowhere")).status == 404
    text, samples = await scrape(aiohttp_client, app)
    assert value(samples, "sidecrypt_requests_total", route=ROUTE, status="200") == 3
    assert value(samples, "sidecrypt_requests_total", route="unmatched", status="404") == 1
    assert value(samples, "sidecrypt_request_duration_seconds_count", route=ROUTE) == 3
    assert value(samples, "sidecrypt_upstream_duration_seconds_count", route=ROUTE) == 3
    assert value(samples, "sidecrypt_upstream_duration_seconds_sum", route=ROUTE) == pytest.approx(
        0.009
    )
    assert (
        value(samples, "sidecrypt_fields_total", route=ROUTE, key="app", operation="encrypt") == 6
    )
    calls = dict(key="app", provider="local", operation="generate_data_key", outcome="ok")
    assert value(samples, "sidecrypt_key_provider_calls_total", **calls) == 1
    assert value(samples, "sidecrypt_data_key_cache_hits_total", operation="encrypt") == 2
    assert value(samples, "sidecrypt_data_key_cache_misses_total", operation="encrypt") == 1
    assert value(samples, "sidecrypt_data_key_cache_evictions_total") == 0
    # No audit sink configured: no audit series, and never the global registry.
    assert value(samples, "sidecrypt_audit_queue_depth") is None
    assert prometheus_client.REGISTRY.get_sample_value("sidecrypt_requests_total") is None
    assert CANARY not in text


async def test_registry_reads_see_pending_counts(tmp_path: Path, aiohttp_client: Any) -> None:
    """Counts are batched on the request path; any collection (not only /metrics) folds them in."""
    app = await make_app(tmp_path)
    client = await aiohttp_client(app)
    for _ in range(2):
        assert (await client.post("/users/1", headers={"X-Tenant": "t"}, json={})).status == 200
    reg = metrics.registry(app)
    fields = {"route": ROUTE, "key": "app", "operation": "encrypt"}
    assert reg.get_sample_value("sidecrypt_fields_total", fields) == 4
    assert reg.get_sample_value("sidecrypt_requests_total", {"route": ROUTE, "status": "200"}) == 2
    assert (await client.post("/users/1", headers={"X-Tenant": "t"}, json={})).status == 200
    assert reg.get_sample_value("sidecrypt_fields_total", fields) == 6


async def test_provider_failures_are_counted(tmp_path: Path, aiohttp_client: Any) -> None:
    app = await make_app(tmp_path)
    client = await aiohttp_client(app)
    resp = await client.post("/users/1?bad=1", json={})
    assert resp.status >= 500
    _, samples = await scrape(aiohttp_client, app)
    calls = dict(key="app", provider="local", operation="decrypt_data_key", outcome="error")
    assert value(samples, "sidecrypt_key_provider_calls_total", **calls) == 1
    assert value(samples, "sidecrypt_key_provider_errors_total") == 1
    assert value(samples, "sidecrypt_requests_total", route=ROUTE, status=str(resp.status)) == 1


async def test_each_app_has_its_own_registry(tmp_path: Path, aiohttp_client: Any) -> None:
    first, second = await make_app(tmp_path), await make_app(tmp_path)
    client = await aiohttp_client(first)
    await aiohttp_client(second)
    assert (await client.post("/users/1", json={})).status == 200
    _, one = await scrape(aiohttp_client, first)
    _, two = await scrape(aiohttp_client, second)
    assert value(one, "sidecrypt_requests_total", route=ROUTE, status="200") == 1
    assert value(two, "sidecrypt_requests_total", route=ROUTE, status="200") is None


async def test_audit_queue_series(
    tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDIT_KEY", "metrics-audit-key-0123456789")
    path = tmp_path / "audit.jsonl"
    app = await make_app(tmp_path, {"file": str(path), "hmac_key": {"env": "AUDIT_KEY"}})
    client = await aiohttp_client(app)
    assert (await client.post("/users/1", json={})).status == 200
    trail = app[audit.TRAIL]
    for _ in range(500):
        if trail.written >= 2:
            break
        await asyncio.sleep(0.01)
    text, samples = await scrape(aiohttp_client, app)
    assert value(samples, "sidecrypt_audit_events_written_total") == 2  # generate + encrypt
    assert value(samples, "sidecrypt_audit_dropped_total") == 0
    assert value(samples, "sidecrypt_audit_queue_capacity") == 10_000
    assert value(samples, "sidecrypt_audit_queue_depth") == 0
    assert value(samples, "sidecrypt_audit_healthy") == 1
    assert "metrics-audit-key" not in text


async def test_metrics_through_the_running_proxy(
    tmp_path: Path, upstream: Any, proxy_factory: Any
) -> None:
    import aiohttp

    create_key(tmp_path / "keyring.json", "app")
    raw = {
        "upstream": {"url": upstream.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json", "reload_interval": 0}},
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/users/**"},
                "key": "app",
                "request": {"encrypt": ["$.ssn"]},
            }
        ],
    }
    proxy = await proxy_factory(raw, tls=False, base_dir=tmp_path)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(f"{proxy.url}/users/1", json={"ssn": CANARY}) as resp:
                assert resp.status == 200
        async with session.get(f"{proxy.url}/plain") as resp:
            assert resp.status == 200
        async with session.post(
            f"{proxy.url}/users/1", data=b"{", headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400
        async with session.get(f"{proxy.admin_url}/metrics") as resp:
            text = await resp.text()
    samples = parse(text)
    assert value(samples, "sidecrypt_requests_total", route=ROUTE_LABEL, status="200") == 2
    assert value(samples, "sidecrypt_requests_total", route=ROUTE_LABEL, status="400") == 1
    assert value(samples, "sidecrypt_requests_total", route="unmatched", status="200") == 1
    assert value(samples, "sidecrypt_upstream_duration_seconds_count", route=ROUTE_LABEL) == 2
    fields = dict(route=ROUTE_LABEL, key="app", operation="encrypt")
    assert value(samples, "sidecrypt_fields_total", **fields) == 2
    calls = dict(key="app", provider="local", operation="generate_data_key", outcome="ok")
    assert value(samples, "sidecrypt_key_provider_calls_total", **calls) == 1
    assert value(samples, "sidecrypt_data_key_cache_hits_total", operation="encrypt") == 1
    failed = dict(route=ROUTE_LABEL, step="request_transform", error="malformed_json")
    assert value(samples, "sidecrypt_request_failures_total", **failed) == 1
    assert CANARY not in text


ROUTE_LABEL = "POST /users/**"


def test_request_tallies_match_a_prometheus_histogram() -> None:
    """The hand-kept buckets give what prometheus_client's own Histogram gives, edges included."""
    BUCKETS = metrics.BUCKETS
    values = [*BUCKETS, 0.0, 1e-9, 11.0, *(random.uniform(0, 12) for _ in range(500))]
    reference = prometheus_client.CollectorRegistry()
    hist = prometheus_client.Histogram(
        "ref", "reference", ["route"], buckets=BUCKETS, registry=reference
    )
    ours = metrics.Metrics(web.Application())
    for v in values:
        hist.labels("r").observe(v)
        ours.observe_request(_Request({}), 200, v)  # type: ignore[arg-type]
    for le in [*(str(float(b)) for b in BUCKETS), "+Inf"]:
        labels = {"route": "unmatched", "le": le}
        got = ours.registry.get_sample_value("sidecrypt_request_duration_seconds_bucket", labels)
        want = reference.get_sample_value("ref_bucket", {"route": "r", "le": le})
        assert got == want, le
    got_sum = ours.registry.get_sample_value(
        "sidecrypt_request_duration_seconds_sum", {"route": "unmatched"}
    )
    assert got_sum == pytest.approx(reference.get_sample_value("ref_sum", {"route": "r"}))


class _Request(dict):  # type: ignore[type-arg]
    """The mapping part of a request, all observe_request reads."""
