"""The lean upstream pool (proxy/upstream.py) against a raw scripted server on real sockets.

Every behaviour is checked from both ends: what the caller sees, and what the server received
and how many connections it accepted. The scripted server sends exact bytes, so malformed and
hostile responses (desync, smuggling, truncation, stalls) are tested as hard as the happy path.
A selection of scenarios runs again under uvloop, the loop sidecrypt uses in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop
from tests.conftest import Certs
from tests.proxy.raw_upstream import (
    RawConn,
    RawRequest,
    RawUpstream,
    Script,
    response,
    serve,
    until,
)

from sidecrypt.config import Upstream
from sidecrypt.errors import RequestError, UpstreamError, UpstreamTimeout
from sidecrypt.proxy import tls
from sidecrypt.proxy.upstream import UpstreamPool, UpstreamResponse
from sidecrypt.proxy.upstream_conn import HIGH_WATER, Connection

MB = 1024 * 1024
BIG = 20 * MB
PIECE = 64 * 1024
READ_ANY = 64 * 1024
MAX_LEAD = 8 * MB  # body bytes a producer may run ahead of the server's reader (socket buffers)


@contextlib.asynccontextmanager
async def pool_for(url: str, **settings: Any) -> AsyncIterator[UpstreamPool]:
    settings.setdefault("read_timeout", 5.0)  # a hang shows up as UpstreamTimeout, not a stall
    settings.setdefault("connect_timeout", 5.0)
    pool = UpstreamPool(Upstream(url=url, **settings), source=None)
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def setup(
    script: Script, *, server: dict[str, Any] | None = None, **settings: Any
) -> AsyncIterator[tuple[RawUpstream, UpstreamPool]]:
    async with RawUpstream(script, **(server or {})) as up, pool_for(up.url(), **settings) as pool:
        yield up, pool
        assert not up.errors, up.errors


async def get(
    pool: UpstreamPool,
    target: str = "/",
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | AsyncIterator[bytes] | None = None,
) -> UpstreamResponse:
    return await pool.request(method, target, [("Host", "up.test"), *(headers or [])], body)


async def fetch(pool: UpstreamPool, target: str = "/", **kw: Any) -> tuple[int, bytes]:
    resp = await get(pool, target, **kw)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


@contextlib.contextmanager
def raises_502(match: str | None = None) -> Iterator[pytest.ExceptionInfo[UpstreamError]]:
    """An UpstreamError that is not a timeout: the pool noticed, rather than waiting it out."""
    with pytest.raises(UpstreamError, match=match) as info:
        yield info
    assert not isinstance(info.value, UpstreamTimeout), info.value


def hold() -> Script:
    """Read one request, never answer, keep the connection open."""

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.read_until_eof()

    return script


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


async def assert_closed_by_pool(conn: RawConn) -> None:
    await until(lambda: conn.eof, f"the pool closes server connection #{conn.index}")


# -- keep-alive and exact request bytes ---------------------------------------------------------


async def test_keepalive_reuses_one_connection() -> None:
    async with setup(serve(response(200, b"hello"))) as (up, pool):
        for _ in range(3):
            assert await fetch(pool) == (200, b"hello")
        assert up.accepted == 1
        assert len(up.connections[0].requests) == 3
        assert (pool.open_count, pool.idle_count) == (1, 1)


async def test_request_head_is_sent_exactly_as_given() -> None:
    async with setup(serve(response(200, b"ok"))) as (up, pool):
        headers = [("Host", "up.test"), ("X-One", "1"), ("x-two", "2"), ("X-One", "3")]
        resp = await pool.request("GET", "/a/b%20c?x=1&y=%2F", headers)
        assert await resp.read() == b"ok"
        resp.release()
        assert up.connections[0].requests[0].head == (
            b"GET /a/b%20c?x=1&y=%2F HTTP/1.1\r\n"
            b"Host: up.test\r\nX-One: 1\r\nx-two: 2\r\nX-One: 3\r\n\r\n"
        )


async def test_bytes_body_gets_content_length_once() -> None:
    async with setup(serve(response(200, b"ok"))) as (up, pool):
        await fetch(pool, method="POST", headers=[("X-A", "1")], body=b"hello")
        given = [("Content-Length", "5"), ("X-B", "2")]
        await fetch(pool, method="PUT", headers=given, body=b"world")
        await fetch(pool, method="POST", body=b"")
        first, second, third = up.connections[0].requests
        assert first.body == b"hello" and not first.chunked
        assert [k.lower() for k, _ in first.headers] == [b"host", b"x-a", b"content-length"]
        assert first.header("content-length") == b"5"
        assert second.body == b"world"
        # the pool may own the framing header's position, not its value or its uniqueness
        assert [h for h in second.headers if h[0].lower() != b"content-length"] == [
            (b"Host", b"up.test"),
            (b"X-B", b"2"),
        ]
        assert [v for k, v in second.headers if k.lower() == b"content-length"] == [b"5"]
        assert third.header("content-length") == b"0" and third.body == b""
        assert up.accepted == 1


# -- when a connection must not be reused --------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        response(200, b"ok", headers=(("Connection", "close"),)),
        response(200, b"ok", headers=(("Connection", "Keep-Alive, Close"),)),
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "close-token-in-list", "http-1.0"],
)
async def test_not_reused_when_upstream_says_so(answer: bytes) -> None:
    async with setup(serve(answer)) as (up, pool):
        assert await fetch(pool) == (200, b"ok")
        await assert_closed_by_pool(up.connections[0])
        assert pool.open_count == 0 and pool.idle_count == 0
        assert await fetch(pool) == (200, b"ok")
        assert up.accepted == 2


async def test_body_delimited_by_connection_close() -> None:
    body = b"".join(bytes([65 + i % 26]) * 1000 for i in range(300))

    async def script(conn: RawConn) -> None:
        if await conn.read_request() is None:
            return
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for i in range(0, len(body), 7000):
            await conn.send(body[i : i + 7000])
        # returning closes the connection: that is the end of the body

    async with setup(script) as (up, pool):
        resp = await get(pool)
        assert resp.content_length is None
        assert await resp.read() == body
        resp.release()
        assert pool.open_count == 0
        assert await fetch(pool) == (200, body)
        assert up.accepted == 2


async def test_chunked_response_with_extensions_and_trailers() -> None:
    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await conn.send(b"5;name=value\r\nhello\r\n")
            await conn.send(b"1\r\n \r\n")
            await conn.send(b"a\r\n0123456789\r\n")
            await conn.send(b"0\r\nX-Trailer: t\r\nX-Other: o\r\n\r\n")

    async with setup(script) as (up, pool):
        resp = await get(pool)
        assert resp.content_length is None
        assert "X-Trailer" not in resp.headers
        got = b""
        while piece := await resp.readany():
            got += piece
        assert got == b"hello 0123456789"
        assert await resp.readany() == b""  # stays at the end
        resp.release()
        assert pool.idle_count == 1
        assert await fetch(pool) == (200, b"hello 0123456789")
        assert up.accepted == 1


@pytest.mark.parametrize(
    ("method", "status"),
    [("GET", 204), ("GET", 304), ("HEAD", 200), ("HEAD", 404)],
)
async def test_responses_without_body_keep_the_connection_in_sync(method: str, status: int) -> None:
    bodyless = f"HTTP/1.1 {status} X\r\nContent-Length: 20\r\nETag: e\r\n\r\n".encode()

    def answer(req: RawRequest) -> bytes:
        return bodyless if req.target == "/first" else response(200, b"second")

    async with setup(serve(answer)) as (up, pool):
        resp = await get(pool, "/first", method=method)
        assert resp.status == status
        assert resp.headers["ETag"] == "e"
        assert await resp.read() == b""
        resp.release()
        if method == "GET":
            assert pool.idle_count == 1  # 204/304: a clean exchange, the connection is kept
        assert await fetch(pool, "/next") == (200, b"second")
        if method == "GET":
            assert up.accepted == 1
        elif up.accepted == 1:  # a HEAD connection may be kept too, but then it stays in step
            assert [r.target for r in up.connections[0].requests] == ["/first", "/next"]


async def test_informational_responses_are_skipped() -> None:
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        + response(201, b"made", headers=(("X-Final", "yes"),), reason="Created")
    )
    async with setup(serve(answer)) as (up, pool):
        resp = await get(pool, method="POST", body=b"x")
        assert (resp.status, resp.reason) == (201, "Created")
        assert resp.headers["X-Final"] == "yes"
        assert "Link" not in resp.headers
        assert await resp.read() == b"made"
        resp.release()
        assert await fetch(pool) == (201, b"made")
        assert up.accepted == 1


async def test_switching_protocols_is_an_error() -> None:
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    async with setup(serve(answer)) as (up, pool):
        with raises_502():
            await get(pool, headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")])
        await assert_closed_by_pool(up.connections[0])
        assert pool.open_count == 0


# -- truncation, lost connections ----------------------------------------------------------------


def truncating(head: bytes, *parts: bytes) -> Script:
    """First connection: a response cut short by a close; later ones answer normally."""

    async def script(conn: RawConn) -> None:
        if conn.index > 0:
            await serve(response(200, b"fine"))(conn)
            return
        if await conn.read_request() is None:
            return
        await conn.send(head)
        for part in parts:
            await conn.send(part)

    return script


TRUNCATED = {
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"0123456789"),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"a\r\n0123456789\r\n",
    ),
    "mid-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"64\r\n0123456789"),
    # chunked is the last coding across all Transfer-Encoding headers, not just the first one
    "chunked-in-second-te-header": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"a\r\n0123456789\r\n",
    ),
}


@pytest.mark.parametrize("case", TRUNCATED)
async def test_truncated_body_is_an_error_from_read(case: str) -> None:
    async with setup(truncating(*TRUNCATED[case])) as (up, pool):
        resp = await get(pool)
        with raises_502():
            await resp.read()
        resp.release()
        assert pool.open_count == 0 and pool.idle_count == 0
        assert await fetch(pool) == (200, b"fine")
        assert up.accepted == 2


@pytest.mark.parametrize("case", TRUNCATED)
async def test_truncated_body_is_an_error_from_readany(case: str) -> None:
    async with setup(truncating(*TRUNCATED[case])) as (_up, pool):
        resp = await get(pool)
        got = b""
        with raises_502():
            while piece := await resp.readany():
                got += piece
            pytest.fail(f"readany() reported a clean end after {got!r}")
        assert b"0123456789".startswith(got)
        resp.release()
        assert pool.open_count == 0
        assert await fetch(pool) == (200, b"fine")


@pytest.mark.parametrize(
    "sent",
    [b"", b"HTTP/1.1 200 OK\r\nContent-Len"],
    ids=["nothing", "partial-head"],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_connection_lost_before_the_head(sent: bytes, method: str) -> None:
    async def script(conn: RawConn) -> None:
        if await conn.read_request() is not None:
            await conn.send(sent)

    async with setup(script) as (up, pool):
        with raises_502():
            await asyncio.wait_for(get(pool, method=method), 10)
        assert pool.open_count == 0
        assert 1 <= up.accepted <= 2  # a fresh connection that fails is not retried in a loop


# -- malformed and hostile response heads (desync / smuggling defence) --------------------------

MALFORMED = {
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "te-and-cl": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
    "negative-length": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
    "status-letters": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    "no-space-after-version": b"HTTP/1.1200 OK\r\nContent-Length: 2\r\n\r\nok",
    "not-http": b"garbage garbage\r\n\r\n",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_malformed_response_is_an_error(case: str) -> None:
    async with setup(serve(MALFORMED[case])) as (up, pool):
        with raises_502():
            resp = await get(pool)
            try:
                await resp.read()
            finally:
                resp.release()
        assert pool.open_count == 0 and pool.idle_count == 0
        await assert_closed_by_pool(up.connections[0])


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(2000))
        + b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * (4 * MB),  # never ends
    ],
    ids=["one-huge-header", "many-headers", "endless-header"],
)
async def test_oversized_head_is_an_error(head: bytes) -> None:
    async with setup(serve(head)) as (up, pool):
        with raises_502():
            await get(pool)
        assert pool.open_count == 0
        await assert_closed_by_pool(up.connections[0])


async def test_large_head_within_the_limit_is_fine() -> None:
    big = "b" * (30 * 1024)
    async with setup(serve(response(200, b"ok", headers=(("X-Big", big),)))) as (_up, pool):
        resp = await get(pool)
        assert resp.headers["X-Big"] == big
        assert await resp.read() == b"ok"
        resp.release()


async def test_extra_bytes_after_a_response_never_answer_the_next_request() -> None:
    smuggled = response(200, b"EVIL!")

    def answer(req: RawRequest) -> bytes:
        if req.target == "/first":
            return response(200, b"ok") + smuggled  # more than the framing announced
        return response(200, b"good")

    async with setup(serve(answer)) as (_up, pool):
        assert await fetch(pool, "/first") == (200, b"ok")
        assert await fetch(pool, "/second") == (200, b"good")


async def test_bytes_sent_to_an_idle_connection_never_answer_the_next_request() -> None:
    released = asyncio.Event()
    junk_sent = asyncio.Event()

    async def script(conn: RawConn) -> None:
        if conn.index > 0:
            await serve(response(200, b"good"))(conn)
            return
        await conn.read_request()
        await conn.send(response(200, b"ok"))
        await released.wait()
        await conn.send(response(200, b"EVIL!"))  # unsolicited, while the connection is idle
        junk_sent.set()
        await serve(response(200, b"good"))(conn)

    async with setup(script) as (_up, pool):
        assert await fetch(pool, "/first") == (200, b"ok")
        released.set()
        await junk_sent.wait()
        await asyncio.sleep(0.05)  # the junk reaches the pool's socket before the next request
        assert await fetch(pool, "/second") == (200, b"good")


# -- release and cancellation --------------------------------------------------------------------


async def test_release_before_the_body_is_read_closes_the_connection() -> None:
    async with setup(serve(response(200, b"0123456789"))) as (up, pool):
        resp = await get(pool)
        resp.release()
        resp.release()  # idempotent
        assert pool.open_count == 0 and pool.idle_count == 0
        await assert_closed_by_pool(up.connections[0])
        assert await fetch(pool) == (200, b"0123456789")
        assert up.accepted == 2


async def test_release_after_part_of_the_body_closes_the_connection() -> None:
    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
            await asyncio.sleep(0.01)
            await conn.send(b"def")

    async with setup(script) as (up, pool):
        resp = await get(pool)
        assert await resp.readany() == b"abc"
        resp.release()
        assert pool.open_count == 0
        await assert_closed_by_pool(up.connections[0])


async def test_cancelled_request_closes_its_connection() -> None:
    async def script(conn: RawConn) -> None:
        if conn.index == 0:
            await hold()(conn)
        else:
            await serve(response(200, b"fine"))(conn)

    async with setup(script) as (up, pool):
        task = asyncio.create_task(get(pool, method="POST", body=b"x"))
        await until(lambda: up.accepted == 1 and bool(up.connections[0].requests), "request in")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await assert_closed_by_pool(up.connections[0])
        assert pool.open_count == 0 and pool.idle_count == 0
        assert await fetch(pool) == (200, b"fine")
        assert up.accepted == 2


async def test_cancelled_readany_closes_its_connection() -> None:
    async def script(conn: RawConn) -> None:
        if conn.index > 0:
            await serve(response(200, b"fine"))(conn)
            return
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await conn.read_until_eof()

    async with setup(script) as (up, pool):
        resp = await get(pool)
        assert await resp.readany() == b"abc"
        task = asyncio.create_task(resp.readany())
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        resp.release()  # what the proxy does in its finally block
        await assert_closed_by_pool(up.connections[0])
        assert pool.open_count == 0 and pool.idle_count == 0
        assert await fetch(pool) == (200, b"fine")
        assert up.accepted == 2


async def test_cancelled_request_while_streaming_the_body_closes_the_connection() -> None:
    gate = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"first part"
        await gate.wait()
        yield b"never sent"

    async with setup(hold()) as (up, pool):
        task = asyncio.create_task(get(pool, method="POST", body=body()))
        await until(
            lambda: up.accepted == 1 and b"first part" in up.connections[0].received,
            "the body starts arriving",
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await assert_closed_by_pool(up.connections[0])
        assert pool.open_count == 0


# -- pool size -----------------------------------------------------------------------------------


def gated(gate: asyncio.Event, body: bytes = b"ok") -> Script:
    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await gate.wait()
            await conn.send(response(200, body))

    return script


async def test_pool_size_limits_connections_and_waiters_reuse_them() -> None:
    gate = asyncio.Event()
    async with setup(gated(gate), pool_size=2) as (up, pool):
        tasks = [asyncio.create_task(get(pool, f"/{i}")) for i in range(3)]
        await until(lambda: sum(len(c.requests) for c in up.connections) >= 2, "2 requests in")
        for _ in range(20):  # give a wrong pool every chance to open a third connection
            await asyncio.sleep(0.005)
        assert up.accepted == 2 and pool.open_count == 2
        assert sum(t.done() for t in tasks) == 0
        gate.set()
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            resp = task.result()
            assert await resp.read() == b"ok"
            resp.release()
        for resp in await asyncio.gather(*pending):
            assert await resp.read() == b"ok"
            resp.release()
        assert up.accepted == 2
        assert sum(len(c.requests) for c in up.connections) == 3
        assert pool.idle_count == 2


async def queued_get(pool: UpstreamPool, path: str) -> asyncio.Task[UpstreamResponse]:
    """A GET that has to wait: every slot of ``pool`` is busy."""
    waiter = asyncio.create_task(get(pool, path))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    return waiter


async def test_a_closed_connection_frees_its_slot_for_a_waiter() -> None:
    gate = asyncio.Event()
    gate.set()
    async with setup(gated(gate), pool_size=1) as (up, pool):
        first = await get(pool, "/1")
        waiter = await queued_get(pool, "/2")
        first.release()  # unread body: closed, not reused, but the slot is free again
        second = await asyncio.wait_for(waiter, 5)
        assert await second.read() == b"ok"
        second.release()
        assert up.accepted == 2 and pool.open_count == 1


async def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    gate = asyncio.Event()
    gate.set()
    async with setup(gated(gate), pool_size=1) as (up, pool):
        first = await get(pool, "/1")
        waiter = asyncio.create_task(get(pool, "/2"))
        for _ in range(5):
            await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await first.read() == b"ok"
        first.release()
        assert await asyncio.wait_for(fetch(pool, "/3"), 5) == (200, b"ok")
        assert up.accepted == 1 and pool.open_count == 1


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_idle_connection_closed_by_upstream_is_not_reused(method: str) -> None:
    async def script(conn: RawConn) -> None:
        if await conn.read_request() is not None:
            await conn.send(response(200, b"once"))  # keep-alive allowed... then closes

    async with setup(script) as (up, pool):
        assert await fetch(pool) == (200, b"once")
        await until(lambda: up.connections[0].writer.is_closing(), "server closes")
        for _ in range(20):  # let the pool see the FIN
            await asyncio.sleep(0.002)
        body = b"payload" if method == "POST" else None
        assert await fetch(pool, method=method, body=body) == (200, b"once")
        assert up.accepted == 2


async def test_idle_close_racing_a_new_get_is_retried_on_a_new_connection() -> None:
    async def script(conn: RawConn) -> None:
        if await conn.read_request() is not None:
            await conn.send(response(200, b"once"))

    async with setup(script) as (up, pool):
        for _ in range(5):
            assert await fetch(pool) == (200, b"once")
        assert 2 <= up.accepted <= 10


# -- connect and read timeouts -------------------------------------------------------------------


async def test_connect_refused_is_an_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with pool_for(f"http://127.0.0.1:{port}") as pool:
        with raises_502():
            await get(pool)
        assert pool.open_count == 0


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A listening socket whose accept queue is full: new SYNs are dropped, connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connect_timeout() -> None:
    with full_backlog() as port:
        async with pool_for(f"http://127.0.0.1:{port}", connect_timeout=0.3) as pool:
            with pytest.raises(UpstreamTimeout):
                await asyncio.wait_for(get(pool), 10)
            assert pool.open_count == 0


async def test_read_timeout_waiting_for_the_head() -> None:
    async with setup(hold(), read_timeout=0.3) as (up, pool):
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(get(pool), 10)
        assert pool.open_count == 0
        await assert_closed_by_pool(up.connections[0])


async def test_read_timeout_in_the_body() -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await conn.read_until_eof()

    async with setup(script, read_timeout=0.3) as (up, pool):
        resp = await get(pool)
        assert await resp.readany() == b"abc"
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(resp.readany(), 10)
        resp.release()
        assert pool.open_count == 0
        await assert_closed_by_pool(up.connections[0])


async def test_read_timeout_is_silence_not_total_time() -> None:
    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
            for byte in b"abcdef":
                await asyncio.sleep(0.1)
                await conn.send(bytes([byte]))

    async with setup(script, read_timeout=0.4) as (_up, pool):
        assert await fetch(pool) == (200, b"abcdef")  # 0.6 s in all, never 0.4 s of silence


async def test_a_timer_left_by_the_last_exchange_does_not_cut_the_next_one() -> None:
    """The read timer outlives a wait (it is not re-made per request): armed for the first
    exchange's deadline, it fires early for the second and must wait again, not time it out."""

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(response(200, b"one"))
        await conn.read_request()
        await asyncio.sleep(0.3)  # answers past the first exchange's deadline, within its own
        await conn.send(response(200, b"two"))

    async with setup(script, read_timeout=0.4) as (up, pool):
        assert await fetch(pool) == (200, b"one")
        await asyncio.sleep(0.2)
        assert await fetch(pool) == (200, b"two")
        assert up.accepted == 1


async def test_a_reused_connection_still_times_out() -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(response(200, b"one"))
        await conn.read_request()
        await conn.read_until_eof()

    async with setup(script, read_timeout=0.3) as (up, pool):
        assert await fetch(pool) == (200, b"one")
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(get(pool), 10)
        assert pool.open_count == 0
        await assert_closed_by_pool(up.connections[0])


class _Transport(asyncio.Transport):
    """Records flow control; the rest of a transport is not needed by the call under test."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.written = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False


async def test_a_body_taken_whole_resumes_a_paused_reader() -> None:
    """A body completed by the read that also paused reading (past HIGH_WATER): taking it whole
    must resume reading, or the next exchange on the connection would never be read."""
    conn = Connection(5.0, lambda _: None)
    transport = _Transport()
    conn.connection_made(transport)
    conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None, None, head_only=False)
    body = b"x" * (HIGH_WATER + 1024)
    conn.data_received(response(200, body))
    assert not transport.reading
    assert conn.take_body() == body
    assert transport.reading and conn.reusable()
    assert conn.take_body() == b""  # taken: nothing is handed out twice


# -- request bodies ------------------------------------------------------------------------------


async def test_streamed_body_without_length_is_sent_chunked() -> None:
    async with setup(serve(response(200, b"ok"))) as (up, pool):
        body = chunks(b"hello ", b"", b"world", b"!")  # an empty piece must not end the body
        assert await fetch(pool, method="POST", body=body) == (200, b"ok")
        assert await fetch(pool, method="POST", body=chunks(b"again")) == (200, b"ok")
        first, second = up.connections[0].requests
        assert first.chunked and first.body == b"hello world!"
        assert first.header("content-length") is None
        assert first.header("transfer-encoding") == b"chunked"
        assert second.body == b"again"
        assert up.accepted == 1


async def test_streamed_body_with_length_is_sent_raw() -> None:
    async with setup(serve(response(200, b"ok"))) as (up, pool):
        headers = [("Content-Length", "12")]
        body = chunks(b"hello ", b"", b"world!")
        assert await fetch(pool, method="PUT", headers=headers, body=body) == (200, b"ok")
        assert await fetch(pool) == (200, b"ok")
        first, second = up.connections[0].requests
        assert not first.chunked and first.raw_body == b"hello world!"
        assert first.header("transfer-encoding") is None
        assert second.method == "GET"
        assert up.accepted == 1


@pytest.mark.parametrize(
    ("declared", "parts"),
    [(5, (b"hello", b" world")), (20, (b"hello", b" world"))],
    ids=["longer-than-declared", "shorter-than-declared"],
)
async def test_streamed_body_not_matching_its_length_is_refused(
    declared: int, parts: tuple[bytes, ...]
) -> None:
    async with setup(serve(response(200, b"ok"))) as (up, pool):
        headers = [("Content-Length", str(declared))]
        with pytest.raises((UpstreamError, RequestError, ValueError)):
            resp = await asyncio.wait_for(
                get(pool, method="POST", headers=headers, body=chunks(*parts)), 10
            )
            resp.release()
        assert pool.open_count == 0
        await assert_closed_by_pool(up.connections[0])
        # what went out never reads as a second request on that connection
        assert len(up.connections[0].requests) <= 1


async def test_upstream_that_stops_reading_the_body_times_out() -> None:
    async def script(conn: RawConn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")  # the head, then nothing more is read
        await asyncio.Event().wait()

    server = {"rcvbuf": 64 * 1024}
    async with setup(script, server=server, read_timeout=0.3) as (_up, pool):
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(get(pool, method="POST", body=pattern_body(BIG, lambda: 0)), 10)
        assert pool.open_count == 0


async def test_early_response_while_the_body_is_still_uploading() -> None:
    """An upstream may refuse a large upload (413) before reading it; the answer is relayed."""

    async def script(conn: RawConn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.send(response(413, b"too big", headers=(("Connection", "close"),)))
        await asyncio.Event().wait()  # never reads the body, keeps the connection open

    server = {"rcvbuf": 64 * 1024}
    async with setup(script, server=server, read_timeout=2.0) as (_up, pool):
        resp = await asyncio.wait_for(
            get(pool, method="POST", body=pattern_body(BIG, lambda: 0)), 10
        )
        assert resp.status == 413
        assert await resp.read() == b"too big"
        resp.release()
        assert pool.open_count == 0


async def test_early_response_while_the_client_body_stalls() -> None:
    """The upstream refuses (401) after the head while the client's body stalls: relay the 401.

    aiohttp's client (what the pool replaces) returns the answer at once; waiting for the
    client's next chunk turns the upstream's answer into the proxy's body timeout.
    """
    stalled = asyncio.Event()

    async def script(conn: RawConn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.send(response(401, b"who?", headers=(("Connection", "close"),)))
        await conn.read_until_eof()

    async def body() -> AsyncIterator[bytes]:
        yield b"part one"
        await stalled.wait()  # the client stops sending (set only at the end of the test)
        yield b"part two"

    async with setup(script) as (_up, pool):
        try:
            resp = await asyncio.wait_for(get(pool, method="POST", body=body()), 3)
            assert resp.status == 401
            assert await resp.read() == b"who?"
            resp.release()
            assert pool.open_count == 0
        finally:
            stalled.set()


def refuses_first(then: Callable[[RawConn], Awaitable[object]]) -> Script:
    """The first connection answers 403 (keep-alive allowed) as soon as the head is in, then
    runs ``then``; later connections answer 200 "fine"."""

    async def script(conn: RawConn) -> None:
        if conn.index > 0:
            await serve(response(200, b"fine"))(conn)
            return
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.send(response(403, b"no"))  # before the body
        await then(conn)

    return script


async def body_held_until(head_seen: asyncio.Event, *rest: bytes) -> AsyncIterator[bytes]:
    """One piece, then the rest once the pool has the answer."""
    yield b"part one"
    await head_seen.wait()
    for piece in rest:
        yield piece


async def test_a_request_answered_before_its_body_was_sent_is_not_reused() -> None:
    head_seen = asyncio.Event()
    script = refuses_first(RawConn.read_until_eof)  # body not read

    async with setup(script) as (up, pool):
        body = body_held_until(head_seen, b"part two", b"part three")
        resp = await asyncio.wait_for(get(pool, method="POST", body=body), 10)
        head_seen.set()
        assert resp.status == 403
        assert await resp.read() == b"no"
        resp.release()
        assert pool.open_count == 0  # the upstream still expects the rest of the body
        await assert_closed_by_pool(up.connections[0])
        assert await fetch(pool) == (200, b"fine")
        assert up.accepted == 2


class BodyBroke(Exception):
    pass


@pytest.mark.parametrize("with_length", [False, True])
async def test_body_iterator_that_raises_propagates_and_closes(with_length: bool) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        await asyncio.sleep(0)
        raise BodyBroke("client went away")

    headers = [("Content-Length", "100")] if with_length else []
    async with setup(serve(response(200, b"ok"))) as (up, pool):
        with pytest.raises(BodyBroke, match="client went away"):
            await get(pool, method="POST", headers=headers, body=body())
        assert pool.open_count == 0 and pool.idle_count == 0
        await assert_closed_by_pool(up.connections[0])
        assert up.connections[0].requests == []  # never a complete request upstream


def pattern_body(total: int, lead: Callable[[], int]) -> AsyncIterator[bytes]:
    """``total`` bytes in 64 KiB pieces; fails if the producer runs far ahead of the server."""
    piece = bytes(range(256)) * (PIECE // 256)

    async def gen() -> AsyncIterator[bytes]:
        sent = 0
        while sent < total:
            n = min(PIECE, total - sent)
            ahead = sent - lead()
            assert ahead <= MAX_LEAD, f"body buffered: {ahead} bytes ahead of the server"
            yield piece[:n]
            sent += n

    return gen()


def pattern_digest(total: int) -> str:
    piece = bytes(range(256)) * (PIECE // 256)
    digest = hashlib.sha256()
    for start in range(0, total, PIECE):
        digest.update(piece[: min(PIECE, total - start)])
    return digest.hexdigest()


@pytest.mark.parametrize("with_length", [False, True], ids=["chunked", "content-length"])
async def test_large_streamed_body_with_backpressure(with_length: bool) -> None:
    def answer(req: RawRequest) -> bytes:
        return response(200, hashlib.sha256(req.body).hexdigest().encode())

    server = {"rcvbuf": 64 * 1024, "read_delay": 0.0002}
    async with setup(serve(answer), server=server) as (up, pool):

        def received() -> int:
            return up.connections[0].body_received if up.connections else 0

        headers = [("Content-Length", str(BIG))] if with_length else []
        resp = await get(pool, method="POST", headers=headers, body=pattern_body(BIG, received))
        assert (await resp.read()).decode() == pattern_digest(BIG)
        resp.release()
        assert up.connections[0].requests[0].chunked is not with_length
        assert pool.idle_count == 1


async def test_large_response_body_streams_with_backpressure() -> None:
    all_sent = asyncio.Event()
    piece = bytes(range(256)) * (PIECE // 256)

    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            conn.writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n".encode())
            for _ in range(BIG // PIECE):
                conn.writer.write(piece)
            await conn.writer.drain()
            all_sent.set()

    async with setup(script) as (_up, pool):
        resp = await get(pool)
        assert resp.content_length == BIG
        digest = hashlib.sha256()
        first = await resp.readany()
        digest.update(first)
        total = len(first)
        # Not reading: the pool must stop reading the socket too, so the server cannot finish.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_sent.wait(), 0.3)
        assert not all_sent.is_set(), "the pool buffered the whole body without being read"
        biggest = 0
        while piece_read := await resp.readany():
            digest.update(piece_read)
            total += len(piece_read)
            biggest = max(biggest, len(piece_read))
        assert total == BIG and digest.hexdigest() == pattern_digest(BIG)
        assert biggest < BIG // 2
        resp.release()
        assert pool.idle_count == 1


# -- headers ------------------------------------------------------------------------------------


async def test_header_values_round_trip_as_bytes() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nX-Latin: caf\xe9\r\nX-Utf8: caf\xc3\xa9\r\n"
        b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Type: Application/JSON; charset=utf-8\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    async with setup(serve(answer)) as (up, pool):
        # how aiohttp's server hands over raw bytes: UTF-8 decoded with surrogateescape
        sent = [("X-Utf8", b"caf\xc3\xa9".decode("utf-8", "surrogateescape"))]
        sent.append(("X-Latin", b"caf\xe9".decode("utf-8", "surrogateescape")))
        resp = await get(pool, headers=sent)
        req = up.connections[0].requests[0]
        assert req.header("x-utf8") == b"caf\xc3\xa9"
        assert req.header("x-latin") == b"caf\xe9"
        assert resp.headers["x-utf8"].encode("utf-8", "surrogateescape") == b"caf\xc3\xa9"
        assert resp.headers["X-LATIN"].encode("utf-8", "surrogateescape") == b"caf\xe9"
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert resp.content_type == "application/json"
        assert resp.content_length == 2
        assert await resp.read() == b"{}"
        resp.release()


async def test_content_type_defaults_like_aiohttp() -> None:
    async with setup(serve(response(200, b"x"))) as (_up, pool):
        resp = await get(pool)
        assert resp.content_type == "application/octet-stream"
        await resp.read()
        resp.release()


@pytest.mark.parametrize(
    "headers",
    [
        [("X-A", "a\r\nX-Evil: 1")],
        [("X-A", "a\rX-Evil: 1")],
        [("X-A", "a\nX-Evil: 1")],
        [("X-A\r\nX-Evil", "1")],
    ],
    ids=["crlf", "cr", "lf", "in-name"],
)
async def test_header_with_line_break_is_refused_and_nothing_sent(
    headers: list[tuple[str, str]],
) -> None:
    async with setup(serve(response(200, b"ok"))) as (up, pool):
        with pytest.raises((ValueError, UpstreamError)):
            resp = await get(pool, method="POST", headers=headers, body=b"x")
            resp.release()
        assert await fetch(pool, "/after") == (200, b"ok")
        received = b"".join(bytes(c.received) for c in up.connections)
        assert b"X-Evil" not in received
        assert [r.target for c in up.connections for r in c.requests] == ["/after"]


async def test_unencodable_head_is_refused_without_echoing_it() -> None:
    """A lone surrogate outside surrogateescape's range cannot be sent; the error must not carry
    the head (UnicodeEncodeError's args would hold all of it, Authorization included)."""
    async with setup(serve(response(200, b"ok"))) as (up, pool):
        headers = [("Authorization", "Bearer CANARY-SECRET"), ("X-Bad", "\ud800")]
        with pytest.raises(UpstreamError) as info:
            await get(pool, headers=headers)
        assert "CANARY-SECRET" not in repr(info.value) and info.value.__cause__ is None
        assert info.value.__suppress_context__
        assert await fetch(pool, "/after") == (200, b"ok")
        assert [r.target for c in up.connections for r in c.requests] == ["/after"]


async def test_target_with_line_break_is_refused() -> None:
    async with setup(serve(response(200, b"ok"))) as (up, pool):
        with pytest.raises((ValueError, UpstreamError)):
            resp = await get(pool, "/a HTTP/1.1\r\nX-Evil: 1\r\nX: /b")
            resp.release()
        assert await fetch(pool, "/after") == (200, b"ok")
        assert b"X-Evil" not in b"".join(bytes(c.received) for c in up.connections)


# -- TLS -----------------------------------------------------------------------------------------


def tls_server(certs: Certs) -> dict[str, Any]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    return {"ssl_context": ctx}


async def test_https_upstream_verified_with_its_ca(certs: Certs) -> None:
    async with RawUpstream(serve(response(200, b"secure")), **tls_server(certs)) as up:
        for host in ("localhost", "127.0.0.1"):
            async with pool_for(up.url(host), ca=certs.ca_file) as pool:
                assert await fetch(pool) == (200, b"secure")
                assert await fetch(pool) == (200, b"secure")
        assert up.accepted == 2  # one kept-alive connection per pool


async def test_https_upstream_without_its_ca_fails_verification(certs: Certs) -> None:
    async with RawUpstream(serve(response(200, b"secure")), **tls_server(certs)) as up:
        async with pool_for(up.url("localhost")) as pool:
            with raises_502():
                await get(pool)
            assert pool.open_count == 0
        assert all(not c.requests for c in up.connections)


async def test_https_upstream_with_verification_off(certs: Certs) -> None:
    server = RawUpstream(serve(response(200, b"secure")), **tls_server(certs))
    async with server as up, pool_for(up.url("localhost"), insecure_skip_verify=True) as pool:
        assert await fetch(pool) == (200, b"secure")


async def test_https_large_bodies_both_ways(certs: Certs) -> None:
    total = 4 * MB

    def answer(req: RawRequest) -> bytes:
        return response(200, req.body)

    server = RawUpstream(serve(answer), **tls_server(certs))
    async with server as up, pool_for(up.url("localhost"), ca=certs.ca_file) as pool:
        body = pattern_body(total, lambda: sum(c.body_received for c in up.connections))
        resp = await get(pool, method="POST", body=body)
        digest = hashlib.sha256()
        size = 0
        while piece := await resp.readany():
            digest.update(piece)
            size += len(piece)
        resp.release()
        assert size == total and digest.hexdigest() == pattern_digest(total)
        assert pool.idle_count == 1


# -- closing the pool ----------------------------------------------------------------------------


async def test_close_closes_idle_connections() -> None:
    async with RawUpstream(serve(response(200, b"ok"))) as up:
        pool = UpstreamPool(Upstream(url=up.url()), source=None)
        assert await fetch(pool) == (200, b"ok")
        assert pool.idle_count == 1
        await pool.close()
        assert pool.open_count == 0 and pool.idle_count == 0
        await assert_closed_by_pool(up.connections[0])


# -- regressions from the security review -------------------------------------------------------


async def test_https_scheme_in_upper_case_is_still_tls() -> None:
    """``HTTPS://`` is https: the request must never go out in plaintext."""

    async def script(conn: RawConn) -> None:  # a plain server: record what arrives, hang up
        conn.received += await conn.reader.read(READ_ANY)

    async with RawUpstream(script) as up:
        url = f"HTTPS://127.0.0.1:{up.port}"
        async with pool_for(url, connect_timeout=2.0, read_timeout=2.0) as pool:
            with pytest.raises(UpstreamError):
                await asyncio.wait_for(
                    get(
                        pool,
                        method="POST",
                        headers=[("Authorization", "Bearer SECRET")],
                        body=b'{"card": "4111"}',
                    ),
                    10,
                )
        received = bytes(up.connections[0].received)
        assert b"POST /" not in received and b"Authorization" not in received
        assert received[:1] in (b"", b"\x16"), received[:16]  # a TLS ClientHello, or nothing
    assert tls.upstream_context(Upstream(url="HTTPS://h")) is not None


async def test_endless_trailer_is_an_error_not_a_hang() -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        await conn.send(b"0\r\nX-Trailer: ")
        for _ in range(64):  # 1 MiB of one trailer line, never finished
            await conn.send(b"a" * 16 * 1024)
        await conn.read_until_eof()

    async with setup(script) as (up, pool):
        resp = await get(pool)
        with raises_502():
            await asyncio.wait_for(resp.read(), 10)
        resp.release()
        assert pool.open_count == 0
        await assert_closed_by_pool(up.connections[0])


async def test_a_connection_discarded_mid_exchange_is_aborted_not_flushed() -> None:
    """A cancelled request's unsent body is dropped, not left flushing to a stalled upstream."""
    total = 16 * MB
    head_in, cancelled = asyncio.Event(), asyncio.Event()

    async def script(conn: RawConn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")  # the head; the body stays unread...
        head_in.set()
        await cancelled.wait()
        await conn.read_until_eof()  # ...until the pool has given the connection up

    async with setup(script, server={"rcvbuf": 64 * 1024}, read_timeout=30.0) as (up, pool):
        task = asyncio.create_task(get(pool, method="POST", body=b"x" * total))
        await asyncio.wait_for(head_in.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.open_count == 0 and pool.idle_count == 0
        cancelled.set()
        conn = up.connections[0]
        await until(lambda: conn.eof, "the server sees the connection end")
        # only what the kernel had already taken arrives; a flushing close sends all 16 MiB
        assert len(conn.received) < total, len(conn.received)


async def test_read_timeout_does_not_run_during_a_slow_upload() -> None:
    pieces = 6

    async def body() -> AsyncIterator[bytes]:
        for i in range(pieces):  # 0.9 s of steady upload, with read_timeout 0.3 s
            if i:
                await asyncio.sleep(0.15)
            yield b"x" * 1000

    async with setup(serve(response(200, b"ok")), read_timeout=0.3) as (up, pool):
        assert await fetch(pool, method="POST", body=body()) == (200, b"ok")
        assert up.connections[0].requests[0].body == b"x" * 1000 * pieces


async def test_full_duplex_upstream_gets_the_whole_upload() -> None:
    """An upstream that answers and echoes while still reading the body (progress, echo)."""
    count = 128  # 8 MiB in 64 KiB pieces: the upload is paused by backpressure many times

    async def script(conn: RawConn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            size = int((await conn.reader.readuntil(b"\r\n"))[:-2], 16)
            data = await conn.reader.readexactly(size)
            await conn.reader.readexactly(2)
            if size == 0:
                break
            conn.body_received += size
            await conn.send(b"%x\r\n%b\r\n" % (16, data[:16]))  # echo while reading
        await conn.send(b"0\r\n\r\n")
        await conn.read_until_eof()

    async def body() -> AsyncIterator[bytes]:
        for i in range(count):
            yield bytes([i]) * PIECE

    server = {"rcvbuf": 64 * 1024}
    async with setup(script, server=server, read_timeout=2.0) as (up, pool):
        resp = await asyncio.wait_for(get(pool, method="POST", body=body()), 10)
        assert resp.status == 200
        echo = await asyncio.wait_for(resp.read(), 10)
        resp.release()
        assert echo == b"".join(bytes([i]) * 16 for i in range(count))
        assert up.connections[0].body_received == count * PIECE


async def test_answered_before_the_body_was_sent_is_not_reused_when_released_late() -> None:
    head_seen = asyncio.Event()

    async def read_the_body(conn: RawConn) -> None:  # reads the body, answers no more
        while piece := await conn.reader.read(READ_ANY):
            conn.received += piece
        conn.eof = True

    async with setup(refuses_first(read_the_body)) as (up, pool):
        body = body_held_until(head_seen, b"part two")
        resp = await asyncio.wait_for(get(pool, method="POST", body=body), 10)
        head_seen.set()
        assert resp.status == 403
        assert await resp.read() == b"no"
        conn = up.connections[0]
        await until(lambda: conn.received.endswith(b"0\r\n\r\n"), "the upload finishes")
        resp.release()  # a slow caller: the upload ended before the release
        assert pool.open_count == 0 and pool.idle_count == 0
        await assert_closed_by_pool(conn)
        assert await fetch(pool) == (200, b"fine")
        assert up.accepted == 2


async def test_a_waiter_cancelled_as_a_slot_frees_raises_cancelled_error() -> None:
    gate = asyncio.Event()
    gate.set()
    async with setup(gated(gate), pool_size=1) as (up, pool):
        first = await get(pool, "/1")
        assert await first.read() == b"ok"
        waiter = await queued_get(pool, "/2")
        waiter.cancel()
        first.release()  # the same loop turn: the slot frees and the waiter is woken
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.open_count == 1 and pool.idle_count == 1
        assert await asyncio.wait_for(fetch(pool, "/3"), 5) == (200, b"ok")
        assert up.accepted == 1 and pool.open_count == 1


async def test_body_delimited_by_close_but_ended_by_a_reset_is_truncated() -> None:
    seen_head = asyncio.Event()

    async def script(conn: RawConn) -> None:
        if conn.index > 0:
            await serve(response(200, b"fine"))(conn)
            return
        await conn.read_request()
        await conn.send(b'HTTP/1.1 200 OK\r\n\r\n{"partial":')
        await seen_head.wait()
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.abort()  # closed with SO_LINGER 0: a reset, not a FIN

    async with setup(script) as (up, pool):
        resp = await get(pool)
        assert resp.status == 200 and resp.content_length is None
        seen_head.set()
        with raises_502():
            await asyncio.wait_for(resp.read(), 10)
        resp.release()
        assert pool.open_count == 0
        assert await fetch(pool) == (200, b"fine")
        assert up.accepted == 2


async def test_reason_phrase_split_across_reads_is_kept_whole() -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 Every")
        await until(lambda: any(not c.nothing_received for c in pool._all), "the pool reads it")
        await conn.send(b"thing Is Fine\r\nContent-Length: 2\r\n\r\nok")
        await conn.read_until_eof()

    async with setup(script) as (_up, pool):
        resp = await get(pool)
        assert (resp.status, resp.reason) == (200, "Everything Is Fine")
        assert await resp.read() == b"ok"
        resp.release()


# -- the same scenarios on uvloop (sidecrypt's production loop) ----------------------------------

UVLOOP_SCENARIOS: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
    "keepalive": test_keepalive_reuses_one_connection,
    "chunked": test_chunked_response_with_extensions_and_trailers,
    "head": lambda: test_responses_without_body_keep_the_connection_in_sync("HEAD", 200),
    "truncated": lambda: test_truncated_body_is_an_error_from_readany("content-length"),
    "cl-and-te": lambda: test_malformed_response_is_an_error("cl-and-te"),
    "extra-bytes": test_extra_bytes_after_a_response_never_answer_the_next_request,
    "idle-junk": test_bytes_sent_to_an_idle_connection_never_answer_the_next_request,
    "answered-early": test_a_request_answered_before_its_body_was_sent_is_not_reused,
    "cancel-request": test_cancelled_request_closes_its_connection,
    "cancel-readany": test_cancelled_readany_closes_its_connection,
    "pool-size": test_pool_size_limits_connections_and_waiters_reuse_them,
    "idle-closed": lambda: test_idle_connection_closed_by_upstream_is_not_reused("POST"),
    "read-timeout": test_read_timeout_waiting_for_the_head,
    "connect-timeout": test_connect_timeout,
    "body-raises": lambda: test_body_iterator_that_raises_propagates_and_closes(False),
    "upload-chunked": lambda: test_large_streamed_body_with_backpressure(False),
    "download": test_large_response_body_streams_with_backpressure,
}


@pytest.mark.parametrize("scenario", UVLOOP_SCENARIOS)
def test_on_uvloop(scenario: str) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(UVLOOP_SCENARIOS[scenario]())


@pytest.mark.parametrize(
    "scenario", ["verified", "unverified", "large"], ids=["verified", "no-ca", "large"]
)
def test_tls_on_uvloop(scenario: str, certs: Certs) -> None:
    run = {
        "verified": test_https_upstream_verified_with_its_ca,
        "unverified": test_https_upstream_without_its_ca_fails_verification,
        "large": test_https_large_bodies_both_ways,
    }[scenario]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(certs))
