"""One /metrics for several workers: merged expositions, each sample labelled with its worker.

The peers are real aiohttp servers on real Unix sockets; the end-to-end run with two worker
processes is tests/test_cli.py::test_two_workers_share_the_port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecrypt.plugins import metrics_workers
from sidecrypt.proxy.workers import Worker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: bytes) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


def exposition(requests: int, latency: float, depth: float) -> bytes:
    """A worker's own exposition: a counter, a histogram and a gauge, as prometheus writes them."""
    registry = CollectorRegistry()
    counter = Counter("sidecrypt_requests", "Requests", ["route"], registry=registry)
    counter.labels("POST /users/**").inc(requests)
    hist = Histogram("sidecrypt_request_duration_seconds", "Time", registry=registry)
    hist.observe(latency)
    Gauge("sidecrypt_audit_queue_depth", "Waiting", registry=registry).set(depth)
    return generate_latest(registry)


def test_merge_labels_every_sample_with_its_worker() -> None:
    merged = metrics_workers.merge(
        [(0, exposition(3, 0.002, 1)), (1, exposition(5, 0.2, 4)), (2, None)]
    )
    samples = parse(merged)
    route = ("route", "POST /users/**")
    assert samples[("sidecrypt_requests_total", frozenset({route, ("worker", "0")}))] == 3
    assert samples[("sidecrypt_requests_total", frozenset({route, ("worker", "1")}))] == 5
    assert samples[("sidecrypt_audit_queue_depth", frozenset({("worker", "1")}))] == 4
    le = ("le", "0.005")
    assert samples[("sidecrypt_request_duration_seconds_bucket", frozenset({le, ("worker", "0")}))]
    assert not samples[
        ("sidecrypt_request_duration_seconds_bucket", frozenset({le, ("worker", "1")}))
    ]
    up = {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == "sidecrypt_worker_up"}
    assert up == {"0": 1.0, "1": 1.0, "2": 0.0}
    # One family per name, described once, whatever the number of workers.
    text = merged.decode()
    assert text.count("# TYPE sidecrypt_requests_total counter") == 1
    assert text.count("# TYPE sidecrypt_request_duration_seconds histogram") == 1
    assert not [k for k in samples if k[0] != "sidecrypt_worker_up" and "worker" not in dict(k[1])]


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[Worker]:
    """Workers 1 and 2 of three serving /metrics on their sockets; worker 3 never started."""
    runners = []
    for index, count in ((1, 7), (2, 11)):
        app = web.Application()
        body = exposition(count, 0.01, 0)

        async def handler(request: web.Request, body: bytes = body) -> web.Response:
            return web.Response(body=body, content_type="text/plain")

        app.router.add_get("/metrics", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, str(tmp_path / f"w{index}.sock")).start()
        runners.append(runner)
    yield Worker(0, 4, tmp_path)
    for runner in runners:
        await runner.cleanup()


async def test_worker_0_gathers_its_peers_over_their_sockets(peers: Worker) -> None:
    started = time.monotonic()
    samples = parse(await metrics_workers.gather(exposition(2, 0.01, 0), peers))
    assert time.monotonic() - started < metrics_workers.PEER_TIMEOUT  # a missing socket: at once
    totals = {
        dict(labels)["worker"]: v
        for (name, labels), v in samples.items()
        if name == "sidecrypt_requests_total"
    }
    assert totals == {"0": 2, "1": 7, "2": 11}
    up = {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == "sidecrypt_worker_up"}
    assert up == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0}


async def _hangs(request: web.Request) -> web.StreamResponse:
    await asyncio.Event().wait()  # released by the runner's cleanup (cancelled)
    raise AssertionError("unreachable")


async def _trickles(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    for _ in range(100):  # 200, then a line now and then, never finished
        await resp.write(b"# x\n")
        await asyncio.sleep(0.05)
    return resp


async def _huge(request: web.Request) -> web.StreamResponse:
    return web.Response(body=exposition(1, 0.01, 0) * 20, content_type="text/plain")


async def _garbled(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"this is not { an exposition\n", content_type="text/plain")


@pytest.mark.parametrize("peer", [_hangs, _trickles, _huge, _garbled])
async def test_a_peer_that_does_not_answer_well_is_down_and_the_scrape_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peer: Any
) -> None:
    """Within PEER_TIMEOUT, whatever the peer does: worker 0's figures are still there."""
    monkeypatch.setattr(metrics_workers, "PEER_TIMEOUT", 0.3)
    monkeypatch.setattr(metrics_workers, "MAX_EXPOSITION", 1000)
    app = web.Application()
    app.router.add_get("/metrics", peer)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "w1.sock")).start()
    try:
        async with asyncio.timeout(3):
            merged = await metrics_workers.gather(exposition(1, 0.01, 0), Worker(0, 2, tmp_path))
    finally:
        await runner.cleanup()
    samples = parse(merged)
    up = {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == "sidecrypt_worker_up"}
    assert up == {"0": 1.0, "1": 0.0}
    assert (
        samples[
            ("sidecrypt_requests_total", frozenset({("route", "POST /users/**"), ("worker", "0")}))
        ]
        == 1
    )


def test_a_metric_with_its_own_worker_label_keeps_distinct_series() -> None:
    """As Prometheus does with a target label a series already has: exported_worker."""
    registry = CollectorRegistry()
    jobs = Counter("plugin_jobs", "Jobs by worker pool", ["worker"], registry=registry)
    jobs.labels("a").inc()
    jobs.labels("b").inc()
    samples = parse(metrics_workers.merge([(0, generate_latest(registry))]))
    for pool in ("a", "b"):
        labels = frozenset({("exported_worker", pool), ("worker", "0")})
        assert samples[("plugin_jobs_total", labels)] == 1
