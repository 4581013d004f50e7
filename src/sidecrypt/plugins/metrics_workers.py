"""One ``/metrics`` for every worker: worker 0 reads the others' and labels each series.

Each worker keeps its own registry (no shared memory, nothing on the request path); at scrape
time worker 0 asks workers 1..N-1 for their exposition over their Unix sockets
(proxy/workers.py), adds a ``worker`` label to every sample and writes one exposition.
``sidecrypt_worker_up{worker}`` says whose figures made it in: a worker that does not answer
within ``PEER_TIMEOUT`` is 0 and its series are absent from that scrape (sum them with
``sum without (worker)``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ..proxy.workers import Worker

PEER_TIMEOUT = 2.0
MAX_EXPOSITION = 16 * 1024 * 1024  # a peer's answer past this is not read: that worker is down


async def gather(own: bytes, worker: Worker) -> bytes:
    """This worker's exposition merged with every peer's."""
    peers = worker.peers()
    texts = await asyncio.gather(*(_fetch(worker, i) for i in peers))
    return merge([(worker.index, own), *zip(peers, texts, strict=True)])


async def _fetch(worker: Worker, index: int) -> bytes | None:
    try:
        connector = aiohttp.UnixConnector(path=str(worker.socket(index)))
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get("http://worker/metrics") as resp,
        ):
            if resp.status != 200:
                return None
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > MAX_EXPOSITION:
                    return None
            return bytes(body)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


def merge(parts: Sequence[tuple[int, bytes | None]]) -> bytes:
    """Expositions by worker index (None: it did not answer) as one, each sample labelled."""
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "sidecrypt_worker_up",
        "1 when the worker's metrics were read for this scrape",
        labels=["worker"],
    )
    for index, text in parts:
        parsed = _parse(text)
        up.add_metric([str(index)], 0.0 if parsed is None else 1.0)
        for family in parsed or ():
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            merged.samples.extend(
                s._replace(labels=_labelled(s.labels, str(index))) for s in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), up]))
    return generate_latest(registry)


def _parse(text: bytes | None) -> list[Metric] | None:
    """A peer's families, or None when it did not answer or sent what does not parse."""
    if text is None:
        return None
    try:
        return list(text_string_to_metric_families(text.decode()))
    except (ValueError, UnicodeDecodeError):
        return None


def _labelled(labels: dict[str, str], worker: str) -> dict[str, str]:
    """``labels`` with ``worker`` added; a metric's own ``worker`` label becomes
    ``exported_worker``, as Prometheus renames a target label a series already has."""
    if "worker" in labels:
        labels = {**labels, "exported_worker": labels["worker"]}
    return {**labels, "worker": worker}


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)
