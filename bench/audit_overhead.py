"""Audit overhead: requests/s with audit off vs on (file sink), same run, same proxy config.

Run from the repository root: ``BENCH_DECRYPT=1 python -m bench.audit_overhead 4000``. Client,
proxy and upstream share one process (plain HTTP, 32 concurrent requests): compare the two
columns with each other, not with bench/RESULTS.md.
"""

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from sidecrypt import config
from sidecrypt.keyring import create_key
from sidecrypt.proxy import server

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
CONC = 32
DECRYPT = os.environ.get("BENCH_DECRYPT") == "1"


async def upstream() -> tuple[web.AppRunner, int]:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{t:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def run(tmp: Path, up_port: int, audit: dict) -> float:
    route = {
        "match": {"methods": ["POST"], "path": "/users/**"},
        "key": "app",
        "request": {"encrypt": ["$.ssn", "$.card.number"]},
    }
    if DECRYPT:
        route["response"] = {"decrypt": ["$.ssn", "$.card.number"]}
    raw = {
        "upstream": {"url": f"http://127.0.0.1:{up_port}"},
        "listen": {"address": "127.0.0.1:0"},
        "admin": {"address": None},
        "keys": {
            "app": {"provider": "local", "keyring": str(tmp / "k.json"), "reload_interval": 0}
        },
        "audit": audit,
        "routes": [route],
    }
    settings = config.parse(raw, file="bench.yaml", base_dir=tmp)
    running, shutdown = await server.start(settings, admin=False)
    port = running.addresses()[0][1]
    body = {"ssn": "123-45-6789", "card": {"number": "4111111111111111"}, "name": "x" * 200}
    url = f"http://127.0.0.1:{port}/users/1"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONC)) as s:

        async def one() -> None:
            async with s.post(url, json=body) as r:
                assert r.status == 200, r.status
                await r.read()

        await asyncio.gather(*(one() for _ in range(200)))  # warm-up
        left = N

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one()

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONC)))
        el = time.perf_counter() - t
    await shutdown()
    return N / el


async def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    create_key(tmp / "k.json", "app")
    os.environ["BENCH_AUDIT_KEY"] = "bench-audit-key-0123456789abcdef"
    runner, up = await upstream()
    on = {"file": str(tmp / "audit.jsonl"), "hmac_key": {"env": "BENCH_AUDIT_KEY"}}
    res = {"off": [], "on": []}
    for _ in range(2):
        res["off"].append(await run(tmp, up, {}))
        res["on"].append(await run(tmp, up, on))
    await runner.cleanup()
    for k, v in res.items():
        print(k, " ".join(f"{x:.0f}" for x in v), "req/s")
    lines = (tmp / "audit.jsonl").read_bytes().count(b"\n")
    print("audit lines", lines)


if __name__ == "__main__":
    asyncio.run(main())
