"""The "minimal Python" reference: a bare aiohttp + uvloop TLS reverse proxy, nothing else.

What a competent engineer writes in an afternoon: one pooled ClientSession (no cookies, no
decompression), hop-by-hop headers dropped, small bodies buffered, no access log. No routes, no
crypto, no audit.
``python -m bench.bare_proxy --port P --upstream URL --cert C --key K --workers N``
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import ssl

import aiohttp
import uvloop
from aiohttp import web

HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def make_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")
    upstream_host = base.split("://", 1)[1]
    app = web.Application()
    holder: dict[str, aiohttp.ClientSession] = {}

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        holder["s"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        yield
        await holder["s"].close()

    async def handle(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["Host"] = upstream_host
        body = await request.read() if request.body_exists else None
        async with holder["s"].request(
            request.method,
            base + request.raw_path,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as up:
            payload = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            return web.Response(status=up.status, headers=out, body=payload)

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def serve(port: int, upstream: str, cert: str, key: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # KeyboardInterrupt: clean exit
    uvloop.install()
    web.run_app(
        make_app(upstream),
        host="127.0.0.1",
        port=port,
        ssl_context=ctx,
        access_log=None,
        reuse_port=True,
        print=None,
        handle_signals=False,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    if a.workers == 1:
        serve(a.port, a.upstream, a.cert, a.key)
        return
    procs = [
        multiprocessing.get_context("spawn").Process(
            target=serve, args=(a.port, a.upstream, a.cert, a.key)
        )
        for _ in range(a.workers)
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
