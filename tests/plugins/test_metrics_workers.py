"""One /metrics for several workers: merged expositions, each sample labelled with its worker.

The peers are real aiohttp servers on real Unix sockets; the end-to-end run with two worker
processes is tests/test_cli.py::test_two_workers_share_the_port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

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


async def test_a_peer_that_hangs_costs_one_timeout_and_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_workers, "PEER_TIMEOUT", 0.3)
    app = web.Application()
    release = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="too late")

    app.router.add_get("/metrics", stuck)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "w1.sock")).start()
    try:
        samples = parse(
            await metrics_workers.gather(exposition(1, 0.01, 0), Worker(0, 2, tmp_path))
        )
    finally:
        release.set()
        await runner.cleanup()
    up = {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == "sidecrypt_worker_up"}
    assert up == {"0": 1.0, "1": 0.0}


async def test_a_peer_answer_past_the_size_limit_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_workers, "MAX_EXPOSITION", 1000)
    app = web.Application()

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=exposition(1, 0.01, 0) * 20, content_type="text/plain")

    app.router.add_get("/metrics", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "w1.sock")).start()
    try:
        samples = parse(
            await metrics_workers.gather(exposition(1, 0.01, 0), Worker(0, 2, tmp_path))
        )
    finally:
        await runner.cleanup()
    up = {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == "sidecrypt_worker_up"}
    assert up == {"0": 1.0, "1": 0.0}
