"""The hot path's shortcuts held to what they replaced, and the gaps a review of them found.

Path checks (the fast check against the previous one, targets that hide a route behind path
parameters or a fragment), the upstream read timer kept across exchanges, bodies taken whole at
the route's limit, the status request observers see from the merged handler, and
``server.send_timeout`` (clients that never read, below the high-water mark, over TLS on
asyncio; slow clients that never stall). Real sockets throughout; every wait is bounded so a
regression fails rather than hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.http_parser import HttpRequestParser
from tests.conftest import Certs, RunningProxy
from tests.proxy.raw_upstream import RawConn, RawUpstream, Script, response, serve, until
from tests.proxy.test_send_timeout import endless, fixed, open_client

from sidecrypt import appkeys, hookimpl
from sidecrypt.config import Settings
from sidecrypt.config import Upstream as UpstreamSettings
from sidecrypt.errors import RequestError, UpstreamTimeout
from sidecrypt.keyring import create_key
from sidecrypt.proxy import forward
from sidecrypt.proxy.upstream import UpstreamPool

LIMIT = 10.0  # no step of a passing test comes near this
SECRET = "SECRET-rv5-4d1f"


# -- check_path: the fast path refuses exactly what the previous check refused ------------------


def _old_check_path(request: Any) -> None:
    """check_path as of 25befbf (git show 25befbf:src/sidecrypt/proxy/forward.py)."""
    raw = request.raw_path.split("?", 1)[0]
    if not raw.startswith("/") or "//" in raw:
        raise RequestError("empty", code="ambiguous_path")
    lowered = raw.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in raw:
        raise RequestError("slash", code="ambiguous_path")
    path = request.path
    if "/./" in path or "/../" in path or path.endswith(("/.", "/..")):
        raise RequestError("dot", code="ambiguous_path")


def _verdict(check: Any, target: Any) -> str | None:
    try:
        check(target)
    except RequestError as exc:
        return exc.message
    return None


def test_check_path_refuses_all_the_previous_one_did() -> None:
    """Every target made of up to four pieces (dots, escapes, slashes, backslashes, ';', '#',
    '?'), parsed by aiohttp's C parser as both engines do: whatever the check refused before the
    fast path it still refuses, and what it refuses now besides is a fragment or a dot segment
    with path parameters."""
    pieces = ["/", ".", "..", "%2e", "%2E", "%2f", "%5C", "\\", "a", "%41", ";", "#", "?", "%25"]
    parser = HttpRequestParser(mock.Mock(), asyncio.new_event_loop(), 2**16, max_line_size=8190)
    checked = 0
    for n in range(1, 5):
        for combo in itertools.product(pieces, repeat=n):
            raw = "/" + "".join(combo)
            try:
                messages, _, _ = parser.feed_data(f"GET {raw} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            except Exception:  # refused by the parser: never reaches check_path
                parser = HttpRequestParser(
                    mock.Mock(), asyncio.new_event_loop(), 2**16, max_line_size=8190
                )
                continue
            msg = messages[0][0]
            target = SimpleNamespace(raw_path=msg.path, path=msg.url.path)
            old = _verdict(_old_check_path, target)
            new = _verdict(forward.check_path, target)
            assert old is None or new is not None, (raw, old)
            if old is None and new is not None:
                assert "#" in msg.path or ";" in msg.path, (raw, new)
            checked += 1
    assert checked > 30_000


# -- path forms the route matcher and common upstreams read differently (pre-existing) -----------


def _route_config(upstream_url: str) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream_url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json", "reload_interval": 0}},
        "routes": [
            {
                "match": {"methods": ["*"], "path": "/users/**"},
                "key": "app",
                "request": {"encrypt": ["$.ssn"]},
                "max_body_size": 2048,
            }
        ],
    }


@pytest.mark.parametrize(
    "target", ["/public/..;/users/1", "/public#/../users/1", "/;/users/1", "/;x=1/users/1"]
)
async def test_a_route_hidden_behind_a_path_parameter_or_fragment_is_not_sent_plaintext(
    proxy_factory: Any, tmp_path: Path, target: str
) -> None:
    async with RawUpstream(serve(response(200, b"{}"))) as up:
        create_key(tmp_path / "keyring.json", "app")
        proxy = await proxy_factory(_route_config(up.url()), tls=False, base_dir=tmp_path)
        body = json.dumps({"ssn": SECRET}).encode()
        status, _ = await raw_exchange(
            proxy,
            f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body,
        )
        received = b"".join(bytes(c.received) for c in up.connections)
        assert SECRET.encode() not in received, (status, received[:200])
        assert status == 400


async def raw_exchange(proxy: RunningProxy, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read until the proxy closes; the status and the whole answer."""
    port = int(proxy.url.rsplit(":", 1)[1])
    async with asyncio.timeout(LIMIT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        answer = await reader.read()
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


# -- the kept upstream read timer ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def pool_for(script: Script, read_timeout: float) -> AsyncIterator[tuple[Any, UpstreamPool]]:
    async with RawUpstream(script) as up:
        pool = UpstreamPool(
            UpstreamSettings(url=up.url(), read_timeout=read_timeout, connect_timeout=5.0),
            source=None,
        )
        try:
            yield up, pool
        finally:
            await pool.close()
        assert not up.errors, up.errors


async def fetch(pool: UpstreamPool, **kw: Any) -> tuple[int, bytes]:
    resp = await pool.request(
        kw.pop("method", "GET"), "/", [("Host", "up.test")], kw.pop("body", None)
    )
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


async def test_a_reused_connection_times_out_when_the_body_stalls() -> None:
    """A timer left armed by the first exchange must still bound silence mid-body in the next."""

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(response(200, b"one"))
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await conn.read_until_eof()

    async with pool_for(script, 0.3) as (up, pool), asyncio.timeout(LIMIT):
        assert await fetch(pool) == (200, b"one")
        resp = await pool.request("GET", "/", [("Host", "up.test")], None)
        assert await resp.readany() == b"abc"
        with pytest.raises(UpstreamTimeout):
            await resp.readany()
        resp.release()
        assert up.accepted == 1


async def test_a_slow_upload_on_a_reused_connection_is_not_cut_but_silence_after_it_is() -> None:
    """Exchange 1 leaves the timer armed; exchange 2 uploads for 3x read_timeout (no false
    timeout), then the upstream says nothing: a timeout counted from the upload's end."""

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(response(200, b"one"))
        await conn.read_request()
        await conn.send(response(200, b"two"))
        await conn.read_request()
        await conn.read_until_eof()  # third: never answered

    async def body() -> AsyncIterator[bytes]:
        for i in range(6):
            if i:
                await asyncio.sleep(0.15)
            yield b"x" * 100

    async with pool_for(script, 0.3) as (up, pool), asyncio.timeout(LIMIT):
        assert await fetch(pool) == (200, b"one")
        assert await fetch(pool, method="POST", body=body()) == (200, b"two")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await fetch(pool, method="POST", body=body())
        assert loop.time() - started >= 0.75  # the upload (0.75 s) was not cut short
        assert up.accepted == 1


async def test_a_closed_connection_leaves_no_timer_behind() -> None:
    """Timers outlive waits now: a connection the pool closed must not stay referenced by one."""

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(response(200, b"one", headers=(("Connection", "close"),)))

    async with pool_for(script, 30.0) as (_up, pool), asyncio.timeout(LIMIT):
        resp = await pool.request("GET", "/", [("Host", "up.test")], None)
        conn = resp._conn
        assert await resp.read() == b"one"
        resp.release()
        await until(lambda: conn.closed, "the connection is closed")
        assert conn._timer is None


# -- bodies taken whole: limits hold, the connection stays in step ---------------------------------


@pytest.mark.parametrize("size", [2048, 2049])
async def test_a_client_body_that_arrived_whole_is_held_to_the_limit_exactly(
    proxy_factory: Any, tmp_path: Path, size: int
) -> None:
    """Content-Length bodies are checked early; a chunked one that arrived whole goes through
    read_nowait + within(): the boundary must be the same (limit allowed, limit + 1 refused)."""
    async with RawUpstream(serve(response(200, b"{}"))) as up:
        create_key(tmp_path / "keyring.json", "app")
        proxy = await proxy_factory(_route_config(up.url()), tls=False, base_dir=tmp_path)
        doc = json.dumps({"ssn": SECRET, "pad": ""}).encode()
        doc = json.dumps({"ssn": SECRET, "pad": "p" * (size - len(doc))}).encode()
        assert len(doc) == size
        status, answer = await raw_exchange(
            proxy,
            b"POST /users/1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"%x\r\n%b\r\n0\r\n\r\n"
            % (len(doc), doc),
        )
        received = b"".join(bytes(c.received) for c in up.connections)
        assert SECRET.encode() not in received
        if size > 2048:
            assert status == 413 and up.accepted == 0, answer[:300]
        else:
            assert status == 200, answer[:300]


async def test_a_pass_through_body_that_arrived_whole_keeps_the_connection_in_step(
    proxy_factory: Any,
) -> None:
    """Pipelined small bodies taken with read_nowait: each request gets its own body, in order."""
    async with RawUpstream(serve(lambda req: response(200, req.body))) as up:
        proxy = await proxy_factory({"upstream": {"url": up.url()}}, tls=False)
        data = b"".join(
            b"POST /p%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
            % (i, len(b"body-%d" % i), b"body-%d" % i)
            for i in range(5)
        )
        data += b"GET /end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        _, answer = await raw_exchange(proxy, data)
        bodies = [r.body for c in up.connections for r in c.requests]
        assert bodies == [b"body-%d" % i for i in range(5)] + [b""]
        for i in range(5):
            assert b"body-%d" % i in answer


# -- Connection tokens, cached per value ----------------------------------------------------------


def test_connection_tokens_are_honoured_and_the_cache_stays_bounded() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    def out(*pairs: tuple[str, str]) -> list[str]:
        headers = CIMultiDictProxy(CIMultiDict([*pairs, ("X-Keep", "1")]))
        return [n for n, _ in forward.response_headers(headers, keep_length=True)]

    assert out(("Connection", " Keep-Alive , X-Secret"), ("X-Secret", "s")) == ["X-Keep"]
    assert out(("Connection", "close"), ("Connection", "X-Secret"), ("X-Secret", "s")) == ["X-Keep"]
    long = "x-a, " * 20 + "X-Secret"  # past the cached length: worked out each time, not kept
    assert out(("Connection", long), ("X-Secret", "s")) == ["X-Keep"]
    forward._tokens.cache_clear()
    for i in range(1000):  # attacker-chosen values: the cache keeps at most 64 short strings
        out(("Connection", f"close, x-{i}"))
    info = forward._tokens.cache_info()
    assert info.maxsize == 64 and info.currsize == 64


# -- the merged handle(): what observers see ------------------------------------------------------


class _Observer:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    @hookimpl
    def sidecrypt_app(self, app: web.Application, settings: Settings) -> None:
        app[appkeys.REQUEST_OBSERVERS].append(self.observe)

    def observe(self, request: Any, status: int, seconds: float) -> None:
        self.seen.append((request.path, status))


async def test_observers_see_the_status_the_client_got(proxy_factory: Any, tmp_path: Path) -> None:
    big = json.dumps({"ssn": "x", "pad": "p" * 4096}).encode()

    def answer(req: Any) -> bytes:
        if req.target == "/users/big":
            return response(200, big, headers=(("Content-Type", "application/json"),))
        return response(201, b"{}", headers=(("Content-Type", "application/json"),))

    async with RawUpstream(serve(answer)) as up:
        create_key(tmp_path / "keyring.json", "app")
        config = _route_config(up.url())
        config["routes"][0]["response"] = {"decrypt": ["$.ssn"]}
        observer = _Observer()
        proxy = await proxy_factory(config, tls=False, base_dir=tmp_path, plugins=(observer,))
        cases = {
            "/plain": b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "/users/big": b"GET /users/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "/a/%2e%2e/b": b"GET /a/%2e%2e/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "/users/1": b"POST /users/1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"%x\r\n%b\r\n0\r\n\r\n"
            % (len(big), big),
        }
        got = {}
        for path, data in cases.items():
            got[path], _ = await raw_exchange(proxy, data)
        assert got == {"/plain": 201, "/users/big": 502, "/a/%2e%2e/b": 400, "/users/1": 413}
        assert sorted(s for _, s in observer.seen) == sorted(got.values())


# -- server.send_timeout --------------------------------------------------------------------------


def _open_client(port: int, ctx: Any = None) -> Any:
    return open_client(f"https://localhost:{port}", ctx)


def _served(up: RawUpstream, n: int) -> bool:
    return sum(len(c.requests) for c in up.connections) == n


def _port(proxy: RunningProxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


async def _small_send_buffer(proxy: RunningProxy) -> Any:
    """The proxy's side of the one client connection, with a small kernel send buffer.

    On loopback Linux autotunes it to ~4 MB, which would hold a whole test's answer before the
    transport ever buffers (on a real network the kernel's share is whatever the path's window
    allows: the transport's buffer is then what fills, as here)."""
    await until(lambda: len(_client_conns(proxy)) == 1, "the proxy accepted the connection")
    (conn,) = _client_conns(proxy)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return conn


async def test_a_client_that_never_reads_is_disconnected_over_tls_on_asyncio(
    proxy_factory: Any, certs: Certs
) -> None:
    """The existing TLS test runs on uvloop only; asyncio's own SSL transport (the loop tests
    and `server.loop: asyncio` use) does its own buffering too."""
    cut = asyncio.Event()
    async with asyncio.timeout(LIMIT), RawUpstream(endless(cut)) as up:
        proxy = await proxy_factory(
            {"upstream": {"url": up.url()}, "server": {"send_timeout": 0.3}}, tls=True
        )
        _reader, writer = await _open_client(_port(proxy), certs.client_context())
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await cut.wait()
        writer.transport.abort()


def _client_conns(proxy: RunningProxy) -> list[Any]:
    server = proxy.running.runners[0].server
    assert server is not None
    conns = getattr(server, "conns", None)  # the lean engine
    return list(conns) if conns is not None else list(server.connections)


async def test_a_never_reading_client_below_the_high_water_mark_is_let_go(
    proxy_factory: Any,
) -> None:
    async with asyncio.timeout(LIMIT), RawUpstream(fixed(4096)) as up:
        proxy = await proxy_factory(
            {
                "upstream": {"url": up.url()},
                "server": {"send_timeout": 0.2, "keepalive_timeout": 0.2},
            },
            tls=False,
        )
        _reader, writer = await _open_client(_port(proxy))
        conn = await _small_send_buffer(proxy)
        served = 0
        while True:  # one answer at a time until the kernel's buffers are full
            writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            served += 1
            await until(functools.partial(_served, up, served), "served")
            await asyncio.sleep(0.05)  # what the kernel takes, it has taken by now
            pending = conn.transport.get_write_buffer_size()
            if pending:
                break
            assert served < 200
        assert 0 < pending < 64 * 1024  # below aiohttp's and asyncio's default high water
        await asyncio.sleep(1.0)  # keepalive_timeout + send_timeout, and then some
        try:
            assert conn.transport is None or conn.transport.is_closing()  # keepalive closed it
            assert _client_conns(proxy) == [], "the connection is still held"
        finally:
            writer.transport.abort()


@pytest.mark.parametrize("kernel_buffer", ["small", "autotuned"])
async def test_a_slow_client_that_never_stalls_gets_all_of_it(
    proxy_factory: Any, kernel_buffer: str
) -> None:
    """4 KiB every 40 ms (~100 KiB/s) with send_timeout 0.25 s: never cut. With the send buffer
    the kernel autotunes, progress reaches the transport's buffer only in steps of a third of
    the kernel's; with a 4 KiB one, in small steps (reading for 3 s at most either way)."""
    size = 200 * 1024 if kernel_buffer == "small" else 3 * 1024 * 1024
    async with asyncio.timeout(LIMIT), RawUpstream(fixed(size)) as up:
        proxy = await proxy_factory(
            {"upstream": {"url": up.url()}, "server": {"send_timeout": 0.25}}, tls=False
        )
        reader, writer = await _open_client(_port(proxy))
        if kernel_buffer == "small":
            await _small_send_buffer(proxy)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        got = 0
        started = time.monotonic()
        try:
            while got < size and time.monotonic() - started < 3:
                piece = await reader.read(4096)
                assert piece, f"cut after {got} of {size} bytes"
                got += len(piece)
                await asyncio.sleep(0.04)
        finally:
            writer.transport.abort()
