"""The issue 19 measurement: N records x 3 fields written through sidecrypt with
``data_keys: {max_uses: 1}`` (standing in for data written across many cache windows or by many
replicas), then one list GET through a freshly started proxy: KMS operations counted at a
front in front of moto_server (tests/kms_counting.py) and the GET's seconds.

Used by tests/crypto/test_hierarchy_kms.py and ``python -m bench.cold_list``. It only uses
``config.parse`` and ``server.start``, so it also runs against older sidecrypt code.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kms_counting import CountingFront
from kms_server import REGION
from sidecrypt import config
from sidecrypt.proxy import server

FIELDS = ("a", "b", "c")


def proxy_config(
    upstream: str, kms: str, *, hierarchy: dict[str, Any] | None, stores: dict[str, Any] | None
) -> dict[str, Any]:
    key: dict[str, Any] = {
        "provider": "kms",
        "key_id": "alias/app",
        "region": REGION,
        "endpoint_url": kms,
    }
    if hierarchy is not None:
        key["hierarchy"] = hierarchy
    raw: dict[str, Any] = {
        "upstream": {"url": upstream},
        "listen": {"address": "127.0.0.1:0"},
        "admin": {"address": None},
        "data_keys": {"max_uses": 1},
        "keys": {"app": key},
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/records"},
                "key": "app",
                "context": {"tenant": "header:X-Tenant"},
                "request": {"encrypt": [f"$.{f}" for f in FIELDS]},
            },
            {
                "match": {"methods": ["GET"], "path": "/records"},
                "key": "app",
                "context": {"tenant": "header:X-Tenant"},
                "response": {
                    "decrypt": [{"path": f"$.items[*].{f}", "bind_as": f"$.{f}"} for f in FIELDS]
                },
            },
        ],
    }
    if stores is not None:
        raw["stores"] = stores
    return raw


class RecordsApp:
    """The legacy app: stores what it is sent, lists it back."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> RecordsApp:
        app = web.Application()

        async def post(request: web.Request) -> web.Response:
            self.records.append(await request.json())
            return web.json_response({"id": len(self.records)}, status=201)

        async def get(request: web.Request) -> web.Response:
            return web.json_response({"items": self.records})

        app.router.add_post("/records", post)
        app.router.add_get("/records", get)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def start_proxy(raw: dict[str, Any], base: Path) -> tuple[str, Any]:
    settings = config.parse(raw, file="cold-list.yaml", base_dir=base)
    running, stop = await server.start(settings)
    return f"http://127.0.0.1:{running.addresses()[0][1]}", stop


async def write_records(url: str, n: int, tenant: str = "acme", concurrency: int = 8) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> None:
            async with sem:
                body = {f: f"{f}-{tenant}-{i}" for f in FIELDS}
                async with session.post(
                    f"{url}/records", json=body, headers={"X-Tenant": tenant}
                ) as resp:
                    assert resp.status == 201, await resp.text()

        await asyncio.gather(*(one(i) for i in range(n)))


async def list_records(url: str, tenant: str = "acme") -> tuple[int, Any, float]:
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.get(f"{url}/records", headers={"X-Tenant": tenant}) as resp:
            body = await resp.read()
        seconds = time.perf_counter() - started
    return resp.status, json.loads(body), seconds


async def measure(
    kms_url: str,
    base: Path,
    *,
    records: int = 200,
    hierarchy: dict[str, Any] | None = None,
    stores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``records`` through one proxy, then GET the list through a fresh one."""
    front = await CountingFront(kms_url).start()
    app = await RecordsApp().start()
    try:
        raw = proxy_config(app.url, front.url, hierarchy=hierarchy, stores=stores)
        url, stop = await start_proxy(raw, base)
        try:
            await write_records(url, records)
        finally:
            await stop()
        written = dict(front.ops)
        url, stop = await start_proxy(raw, base)  # cold: nothing cached
        try:
            front.reset()
            status, body, seconds = await list_records(url)
            warm_status, _, warm_seconds = await list_records(url)
        finally:
            await stop()
        expected = [{f: f"{f}-acme-{i}" for f in FIELDS} for i in range(records)]
        stored = json.dumps(app.records)
        return {
            "status": status,
            "error": None if status == 200 else body,
            "correct": status == 200
            and sorted(body["items"], key=str) == sorted(expected, key=str),
            "plaintext_stored": "a-acme-1" in stored,
            "kms_write": written,
            "kms_cold_list": dict(front.ops),
            "cold_seconds": seconds,
            "warm_status": warm_status,
            "warm_seconds": warm_seconds,
        }
    finally:
        await app.close()
        await front.close()
