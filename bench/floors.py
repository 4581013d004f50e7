"""Floors: what the HTTP machinery alone costs, under the same load as the bench (PROFILE.md).

``python -m bench.floors`` starts the bench's nginx upstream and nginx TLS proxy, then one by one
the minimal servers below, and prints requests/s and CPU µs per request for each (wrk -t1 -c50,
the bench's 1 KB POST, TLS, one process; medians of interleaved rounds). None of them does any
sidecrypt work: they show where the ceiling of each server design sits.

- ``answer-*``: answer every request with the upstream's document, no proxying;
  ``app`` (aiohttp Application), ``dispatch`` (the same with sidecrypt's CatchAll),
  ``front`` (the same app on sidecrypt's lean engine, proxy/front.py),
  ``server`` (aiohttp's low-level web.Server), ``raw`` (asyncio.Protocol + httptools).
- ``proxy-*``: forward to the nginx upstream through sidecrypt's UpstreamPool with a minimal
  handler (no header rules, routes, metrics or fields); the same designs minus ``server``.

``python -m bench.floors serve KIND PORT CERT KEY UPSTREAM`` runs one of them (used by the driver).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import env, report, wrk
from .__main__ import measure, services
from .env import PORTS

KINDS = ("answer-app", "answer-dispatch", "answer-front", "answer-server", "answer-raw")
KINDS += ("proxy-app", "proxy-dispatch", "proxy-front", "proxy-raw")
PORT = 18490


async def _serve(kind: str, port: int, cert: str, key: str, upstream: str, doc: bytes) -> None:
    import httptools
    from aiohttp import web

    from sidecrypt import config
    from sidecrypt.proxy import dispatch, front
    from sidecrypt.proxy.upstream import UpstreamPool

    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    settings = config.parse({"listen": {"address": "127.0.0.1:1"}, "upstream": {"url": upstream}})
    pool = UpstreamPool(settings.upstream)
    host = upstream.split("//", 1)[1]

    async def forward(method: str, target: str, headers: Any, body: bytes) -> tuple[Any, bytes]:
        out = [(k, v) for k, v in headers if k.lower() not in ("host", "connection")]
        out.append(("Host", host))
        up = await pool.request(method, target, out, body)
        try:
            return up, await up.read()
        finally:
            up.release()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=doc, content_type="application/json")

    async def proxy(request: web.Request) -> web.Response:
        body = await request.read()
        up, data = await forward(request.method, request.raw_path, request.headers.items(), body)
        drop = ("connection", "content-length")
        headers = [(k, v) for k, v in up.headers.items() if k.lower() not in drop]
        return web.Response(status=up.status, body=data, headers=headers)

    design = kind.split("-", 1)[1]
    handler = answer if kind.startswith("answer") else proxy
    if design in ("app", "dispatch", "front"):
        app = web.Application()
        route = app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        if design in ("dispatch", "front"):
            dispatch.install(runner, route, handler)
        if design == "front":
            front.install(runner, handler, settings)  # type: ignore[arg-type]
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    elif design == "server":
        await loop.create_server(web.Server(handler, access_log=None), "127.0.0.1", port, ssl=ctx)
    else:
        fixed = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        fixed += b"Content-Length: %d\r\n\r\n%s" % (len(doc), doc)

        tasks: set[asyncio.Task[None]] = set()

        class Raw(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.t = transport
                self.parser = httptools.HttpRequestParser(self)
                self.url, self.headers, self.body = "", [], []  # type: ignore[var-annotated]

            def data_received(self, data: bytes) -> None:
                self.parser.feed_data(data)

            def on_url(self, url: bytes) -> None:
                self.url = url.decode()

            def on_header(self, name: bytes, value: bytes) -> None:
                self.headers.append((name.decode(), value.decode()))

            def on_body(self, body: bytes) -> None:
                self.body.append(body)

            def on_message_complete(self) -> None:
                if kind == "answer-raw":
                    self.t.write(fixed)
                else:
                    method = self.parser.get_method().decode()
                    task = loop.create_task(
                        self.go(method, self.url, self.headers, b"".join(self.body))
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                self.headers, self.body = [], []

            async def go(self, method: str, url: str, headers: Any, body: bytes) -> None:
                up, data = await forward(method, url, headers, body)
                head = [b"HTTP/1.1 %d OK\r\n" % up.status]
                for k, v in up.headers.items():
                    if k.lower() not in ("connection", "content-length"):
                        head.append(f"{k}: {v}\r\n".encode())
                head.append(b"Content-Length: %d\r\n\r\n" % len(data))
                self.t.write(b"".join(head) + data)

        await loop.create_server(Raw, "127.0.0.1", port, ssl=ctx)
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)  # as sidecrypt's settle_gc
    await asyncio.Event().wait()


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        import uvloop

        kind, port, cert, key, upstream, doc = sys.argv[2:8]
        uvloop.run(_serve(kind, int(port), cert, key, upstream, Path(doc).read_bytes()))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated kinds (default: all)")
    a = p.parse_args()
    kinds = [k for k in KINDS if not a.only or k in a.only.split(",")]
    from .procs import Service

    with tempfile.TemporaryDirectory(prefix="sidecrypt-floors-") as tmp:
        w = env.prepare(Path(tmp))
        doc = w.dir / "doc.json"
        doc.write_bytes(w.enc_body)
        svc = {k: v for k, v in services(w).items() if k in ("upstream", "nginx-tls-1")}
        svc["sidecrypt-1"] = services(w)["sidecrypt-1"]
        upstream = f"http://127.0.0.1:{PORTS['upstream']}"
        for i, kind in enumerate(KINDS):
            if kind not in kinds:
                continue
            argv = [sys.executable, "-m", "bench.floors", "serve", kind, str(PORT + i)]
            argv += [str(w.cert), str(w.key), upstream, str(doc)]
            svc[kind] = Service(kind, argv, port=PORT + i, log=w.dir / f"{kind}.log")
        headers = {"Content-Type": "application/json", "X-Tenant": env.CONTEXT["tenant"]}
        script = wrk.lua_script(w.dir / "post.lua", w.body, headers, None)
        configs = {
            "nginx-tls-1": report.Config(
                "nginx-tls-1", "nginx TLS proxy", 1, "nginx-tls-1", _url(PORTS["nginx-tls-1"])
            ),
            "sidecrypt-1": report.Config(
                "sidecrypt-1",
                "sidecrypt pass-through",
                1,
                "sidecrypt-1",
                _url(PORTS["sidecrypt-1"]),
            ),
        }
        for i, kind in enumerate(KINDS):
            if kind not in kinds:
                continue
            configs[kind] = report.Config(kind, kind, 1, kind, _url(PORT + i))
        started: list[Service] = []
        try:
            for s in svc.values():
                s.start()
                started.append(s)
            for s in svc.values():
                s.wait_ready()
            order = list(configs.values())
            for r in range(a.rounds):
                print(f"round {r + 1}/{a.rounds}", flush=True)
                for c in order[r % len(order) :] + order[: r % len(order)]:
                    measure(w, svc, c, script, a.seconds, 1.0)
        finally:
            for s in reversed(started):
                s.stop()
    nginx = configs["nginx-tls-1"].med("rps")
    print("\n| server | requests/s | CPU µs/req | vs nginx TLS |\n|---|---|---|---|")
    for c in configs.values():
        rps, cpu = c.med("rps"), c.med("cpu_us")
        print(f"| {c.label} | {rps:,.0f} | {cpu:.1f} | {rps / nginx:.2f} |")
    return 0


def _url(port: int) -> str:
    return f"https://127.0.0.1:{port}/plain/1"


if __name__ == "__main__":
    sys.exit(main())
