"""A counting front for moto_server: a real HTTP server on 127.0.0.1 that forwards every
request to moto and counts KMS operations by their ``X-Amz-Target`` (``Decrypt``,
``GenerateDataKey``, ...). sidecrypt points its ``endpoint_url`` here, so the count is what
left the process, not what sidecrypt says it sent."""

from __future__ import annotations

from collections import Counter

import aiohttp
from aiohttp import web

_HOP = {"host", "content-length", "transfer-encoding", "connection"}


class CountingFront:
    def __init__(self, target: str) -> None:
        self.target = target
        self.ops: Counter[str] = Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> CountingFront:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        self.ops[target.rpartition(".")[2] or request.method] += 1
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        assert self._session is not None
        async with self._session.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
            return web.Response(status=resp.status, body=data, headers=out)

    def reset(self) -> None:
        self.ops.clear()
