"""Pass-through fidelity over real sockets and real TLS: what the client sends is what the app gets."""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.conftest import Certs
from yarl import URL

from sidecrypt.errors import RequestError
from sidecrypt.proxy import forward


async def test_methods_query_and_headers_pass_through(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory({"upstream": {"url": upstream.url}})
    ctx = certs.client_context()
    async with aiohttp.ClientSession() as s:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            async with s.request(
                method,
                proxy.url + "/a%20b/c?x=1&x=2&odd=%F0%9F%94%91&plus=a+b&empty=",
                ssl=ctx,
                headers=[
                    ("X-Multi", "one"),
                    ("X-Multi", "two"),
                    ("Connection", "keep-alive, X-Drop"),
                    ("X-Drop", "1"),
                ],
                data=b"\x00\x01binary\xff" if method in ("POST", "PUT", "PATCH") else None,
            ) as r:
                assert r.status == 200
                await r.read()
    assert [s.method for s in upstream.seen] == ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    first = upstream.seen[0]
    assert first.path_qs == "/a%20b/c?x=1&x=2&odd=%F0%9F%94%91&plus=a+b&empty="
    names = [k.lower() for k, _ in first.headers]
    assert [v for k, v in first.headers if k.lower() == "x-multi"] == ["one", "two"]
    assert "x-drop" not in names  # named in Connection: hop-by-hop
    assert (
        "connection" not in names
        or dict((k.lower(), v) for k, v in first.headers)["connection"] != "keep-alive, X-Drop"
    )
    hdrs = {k.lower(): v for k, v in first.headers}
    assert hdrs["x-forwarded-for"] == "127.0.0.1"
    assert hdrs["x-forwarded-proto"] == "https"
    assert hdrs["x-forwarded-host"].startswith("localhost:")
    assert hdrs["host"] == upstream.url.removeprefix("http://")
    assert upstream.seen[1].body == b"\x00\x01binary\xff"


async def test_an_ipv6_upstream_gets_a_bracketed_host(certs: Certs, proxy_factory: Any) -> None:
    """RFC 9110: an IPv6 literal in Host is in brackets (``::1:8080`` is not a host and port)."""
    hosts: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hosts.append(request.headers["Host"])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "::1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        proxy = await proxy_factory({"upstream": {"url": f"http://[::1]:{port}"}})
        connector = aiohttp.TCPConnector(ssl=certs.client_context())
        async with (
            aiohttp.ClientSession(connector=connector) as client,
            client.get(f"{proxy.url}/x") as resp,
        ):
            assert (resp.status, await resp.text()) == (200, "ok")
    finally:
        await runner.cleanup()
    assert hosts == [f"[::1]:{port}"]


async def test_chunked_upload_and_streamed_download(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory({"upstream": {"url": upstream.url}})

    async def gen() -> Any:
        for i in range(50):
            yield bytes([i]) * 10_000

    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/up", data=gen(), ssl=certs.client_context()) as r,
    ):
        body = await r.read()
    assert body == b"".join(bytes([i]) * 10_000 for i in range(50))
    assert upstream.seen[0].body == body


async def test_head_204_304_and_redirects_not_followed(
    certs: Certs, upstream_factory: Any, proxy_factory: Any
) -> None:
    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path == "/204":
            return web.Response(status=204)
        if request.path == "/304":
            return web.Response(status=304, headers={"ETag": '"x"'})
        if request.path == "/redirect":
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        return web.Response(body=b"hello head", content_type="text/plain")

    up = await upstream_factory(handler)
    proxy = await proxy_factory({"upstream": {"url": up.url}})
    ctx = certs.client_context()
    async with aiohttp.ClientSession() as s:
        async with s.head(proxy.url + "/file", ssl=ctx) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == "10"
            assert await r.read() == b""
        async with s.get(proxy.url + "/204", ssl=ctx) as r:
            assert r.status == 204
        async with s.get(proxy.url + "/304", ssl=ctx) as r:
            assert r.status == 304
            assert r.headers["ETag"] == '"x"'
        async with s.get(proxy.url + "/redirect", ssl=ctx, allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/elsewhere"
    assert [x.path_qs for x in up.seen] == ["/file", "/204", "/304", "/redirect"]


async def test_upstream_down_is_502_json(
    certs: Certs, proxy_factory: Any, unused_tcp_port: int
) -> None:
    proxy = await proxy_factory({"upstream": {"url": f"http://127.0.0.1:{unused_tcp_port}"}})
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.url + "/x", ssl=certs.client_context()) as r,
    ):
        assert r.status == 502
        body = await r.json()
    assert body["error"]["code"] == "upstream_unavailable"
    assert "message" in body["error"]


async def test_upstream_slower_than_read_timeout_is_504(
    certs: Certs, upstream_factory: Any, proxy_factory: Any
) -> None:
    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(2)
        return web.Response(text="late")

    up = await upstream_factory(slow)
    proxy = await proxy_factory({"upstream": {"url": up.url, "read_timeout": 0.3}})
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.url + "/slow", ssl=certs.client_context()) as r,
    ):
        assert r.status == 504
        assert (await r.json())["error"]["code"] == "upstream_timeout"


async def test_client_disconnect_cancels_upstream_call(
    certs: Certs, upstream_factory: Any, proxy_factory: Any
) -> None:
    cancelled = asyncio.Event()

    async def hang(request: web.Request, body: bytes) -> web.StreamResponse:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="never")

    up = await upstream_factory(hang)
    proxy = await proxy_factory({"upstream": {"url": up.url}})
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.get(
                proxy.url + "/hang",
                ssl=certs.client_context(),
                timeout=aiohttp.ClientTimeout(total=0.5),
            ):
                pass
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_dot_segments_and_encoded_slashes_refused(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory({"upstream": {"url": upstream.url}})
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        int(proxy.url.rsplit(":", 1)[1]),
        ssl=certs.client_context(),
        server_hostname="localhost",
    )
    for raw in ("/public/..%2Fusers", "/public/%2e%2e/users"):
        writer.write(f"GET {raw} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        assert b" 400 " in status, status
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
    writer.close()
    assert upstream.seen == []


class _Target:
    """What check_path reads of a request: the raw target and its decoded path."""

    def __init__(self, raw: str) -> None:
        self.raw_path = raw
        self.path = URL(raw, encoded=True).path


@pytest.mark.parametrize(
    "raw",
    [
        "/users/../x",
        "/users/..",
        "/users/.",
        "/users/./x",
        "/users/%2e%2e/x",
        "/users/%2E%2E",
        "/users/.%2e/x",
        "/users/%2e",
        "/users/a%2fb",
        "/users/a%2Fb",
        "/users/a%5Cb",
        "/users/a\\b",
        "//users",
        "/users//x",
        "users/x",
        "http://other/x",
        "/public/..;/users/1",  # Tomcat, Jetty, Spring: /users/1
        "/public/.;x/users",
        "/public/%2e%2e;v=1/users",
        "/users/..;",
        "/public#/../users/1",
        "/;/users/1",  # an empty segment once its parameters go: Tomcat reads /users/1
        "/;x=1/users/1",
        "/users/;x/1",
        "/%3b/users/1",
        "/public/.;x/../users",
        "/public/..%3b/u",
        "/public?x#y",
    ],
)
def test_check_path_refuses(raw: str) -> None:
    with pytest.raises(RequestError) as info:
        forward.check_path(_Target(raw))  # type: ignore[arg-type]
    assert info.value.code == "ambiguous_path"


@pytest.mark.parametrize(
    "raw",
    [
        "/",
        "/users/1",
        "/files/report.v2.json",
        "/v1.2/users/.well-known",
        "/users/..x/...",
        "/users/%41",
        "/users/1?next=//evil&p=%2f..%2f",  # the query is not part of the path
        "/accounts;jsessionid=x/7",
        "/users/..x;y/a.b;c",
        "/files/a;b.txt",
        "/files/%23tag",  # an encoded '#' is an ordinary character
        "/files/...",
        "/.well-known/openid-configuration",
        "/a/b?next=/../x",  # dots in the query are not the path's business
    ],
)
def test_check_path_lets_through(raw: str) -> None:
    forward.check_path(_Target(raw))  # type: ignore[arg-type]


async def test_large_streaming_body_keeps_memory_bounded(
    certs: Certs, upstream_factory: Any, proxy_factory: Any
) -> None:
    """A 200 MB upload passes through without being buffered by the proxy."""
    received = 0

    async def count(request: web.Request) -> web.StreamResponse:
        nonlocal received
        async for chunk in request.content.iter_any():
            received += len(chunk)
        return web.json_response({"received": received})

    app = web.Application()
    app.router.add_post("/upload", count)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    proxy = await proxy_factory({"upstream": {"url": f"http://127.0.0.1:{port}"}})
    total = 200 * 1024 * 1024
    chunk = b"z" * (1024 * 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async def gen() -> Any:
        for _ in range(total // len(chunk)):
            yield chunk

    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(proxy.url + "/upload", data=gen(), ssl=certs.client_context()) as r,
        ):
            assert (await r.json())["received"] == total
    finally:
        await runner.cleanup()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # client, proxy and upstream share this process: all three together stay far below 200 MB
    assert grown_mb < 100, grown_mb


async def test_identity_headers_never_reach_the_upstream(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory(
        {
            "upstream": {"url": upstream.url},
            "identity": {
                "header": {
                    "principal_header": "X-Caller",
                    "roles_header": "X-Caller-Roles",
                    "trusted_cidrs": ["10.9.9.9/32"],
                }
            },
        }
    )
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            proxy.url + "/x",
            ssl=certs.client_context(),
            headers={
                "X-Caller": "admin",
                "X-Caller-Roles": "root",
                "X-Sidecrypt-Principal": "admin",
                "X-Other": "kept",
            },
        ) as r,
    ):
        assert r.status == 200
    names = {k.lower() for k, _ in upstream.seen[0].headers}
    assert "x-other" in names
    assert not names & {"x-caller", "x-caller-roles", "x-sidecrypt-principal"}


async def test_oversized_header_is_refused(certs: Certs, upstream: Any, proxy_factory: Any) -> None:
    proxy = await proxy_factory(
        {"upstream": {"url": upstream.url}, "server": {"max_header_size": 2048}}
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(
            proxy.url + "/ok", headers={"X-Big": "a" * 1500}, ssl=certs.client_context()
        ) as r:
            assert r.status == 200
        async with s.get(
            proxy.url + "/big", headers={"X-Big": "a" * 3000}, ssl=certs.client_context()
        ) as r:
            assert r.status in (400, 431)
    assert [x.path_qs for x in upstream.seen] == ["/ok"]


async def test_connect_and_trace_are_refused_not_forwarded(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    """CONNECT would ask the app for a tunnel and TRACE echoes credentials back: 405, unsent."""
    proxy = await proxy_factory({"upstream": {"url": upstream.url}})
    async with aiohttp.ClientSession() as s:
        for method in ("TRACE", "CONNECT"):
            async with s.request(
                method, proxy.url + "/a", ssl=certs.client_context(), headers={"Authorization": "x"}
            ) as r:
                if method == "CONNECT" and r.status == 404:
                    continue  # aiohttp's engine routes the authority-form target to its 404
                assert r.status == 405
                assert (await r.json())["error"]["code"] == "method_not_allowed"
    assert upstream.seen == []


async def test_a_pass_through_body_is_not_held_to_the_transform_limit(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    """``server.max_body_size`` bounds bodies a route buffers to transform; a 200 KB upload on an
    unmatched path (read whole, as every body up to 256 KiB) passes on either engine."""
    proxy = await proxy_factory(
        {"upstream": {"url": upstream.url}, "server": {"max_body_size": 65536}}
    )
    body = b"x" * 200_000
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/up", data=body, ssl=certs.client_context()) as r,
    ):
        assert r.status == 200
        await r.read()
    assert upstream.seen[0].body == body
