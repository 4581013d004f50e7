"""The two waits that once had no end: a free pool slot, and the next piece of a streamed upload.

``upstream.pool_timeout`` bounds the wait for a connection when all ``pool_size`` are busy (504
``upstream_pool_timeout``); ``server.body_timeout`` bounds each pause of a streamed upload (408
``body_timeout``, the upstream connection aborted). Real sockets throughout: the scripted raw
upstream (raw_upstream.py) and the real proxy. Every wait is wrapped in ``asyncio.timeout``, so a
regression fails the test instead of hanging it; events, not sleeps, sequence the steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
import yaml
from aiohttp.http_exceptions import TransferEncodingError
from pydantic import ValidationError
from tests.proxy.raw_upstream import RawConn, RawUpstream, Script, response, serve, until
from tests.proxy.test_upstream import assert_closed_by_pool, fetch, get, setup

from sidecrypt import config
from sidecrypt.errors import RequestError, UpstreamTimeout
from sidecrypt.proxy import forward

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 5.0  # no step of a passing test comes near this: reaching it means a hang


def held(gate: asyncio.Event, head: bytes, rest: bytes) -> Script:
    """Answer each request with ``head``; ``rest`` waits for ``gate`` (the slot stays busy)."""

    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await conn.send(head)
            await gate.wait()
            await conn.send(rest)

    return script


def one_shot(gate: asyncio.Event) -> Script:
    """A 200 whose body waits for ``gate``."""
    return held(gate, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", b"ok")


def queued(pool: Any) -> int:
    return sum(not w.done() for w in pool._waiters)


# -- upstream.pool_timeout: the pool ------------------------------------------------------------


async def test_a_request_waits_for_a_slot_at_most_pool_timeout() -> None:
    gate = asyncio.Event()
    async with (
        asyncio.timeout(LIMIT),
        setup(one_shot(gate), pool_size=1, pool_timeout=0.2) as (
            up,
            pool,
        ),
    ):
        first = await get(pool, "/1")  # holds the only connection: its body has not come
        with pytest.raises(UpstreamTimeout) as info:
            await get(pool, "/2")
        err = info.value
        assert (err.status, err.code) == (504, "upstream_pool_timeout")
        assert "upstream.pool_timeout" in err.message and "upstream.pool_size" in err.message
        assert pool.open_count == 1 and queued(pool) == 0
        gate.set()
        assert await first.read() == b"ok"
        first.release()
        assert await fetch(pool, "/3") == (200, b"ok")  # the timed-out waiter took no slot
        assert up.accepted == 1


@contextlib.asynccontextmanager
async def answering_one_slot() -> AsyncIterator[tuple[Any, Any]]:
    """A pool of one connection with a 0.2 s wait budget, to an upstream that answers at once."""
    gate = asyncio.Event()
    gate.set()
    async with (
        asyncio.timeout(LIMIT),
        setup(one_shot(gate), pool_size=1, pool_timeout=0.2) as (up, pool),
    ):
        yield up, pool


async def queue_two(pool: Any, call: Any) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
    """Two waiters for a busy pool: the first with its short budget, the second with a long one."""
    early = asyncio.create_task(call(pool, "/early"))
    await until(lambda: queued(pool) == 1, "the first waiter queues")
    pool._pool_timeout = 30.0  # the second waiter queues behind it with a long budget
    late = asyncio.create_task(call(pool, "/late"))
    await until(lambda: queued(pool) == 2, "the second waiter queues")
    return early, late


async def test_a_timed_out_waiter_leaves_the_slot_to_the_next_one() -> None:
    async with answering_one_slot() as (up, pool):
        first = await get(pool, "/1")
        early, late = await queue_two(pool, get)
        with pytest.raises(UpstreamTimeout):
            await early
        assert not late.done()
        assert await first.read() == b"ok"
        first.release()  # the wake-up must reach the waiter still queued, not the expired one
        second = await late
        assert await second.read() == b"ok"
        second.release()
        assert up.accepted == 1 and pool.open_count == 1 and pool.idle_count == 1


async def test_a_slot_freed_as_the_wait_expires_is_not_lost() -> None:
    """The release and the deadline fall due in one loop turn: one waiter gets the slot (the
    expiring one, or the next), the slot is never lost, and every waiter ends."""
    async with answering_one_slot() as (up, pool):
        first = await get(pool, "/1")
        assert await first.read() == b"ok"
        early, late = await queue_two(pool, fetch)

        def release_as_time_runs_out() -> None:
            first.release()  # wakes the first waiter...
            time.sleep(0.25)  # ...whose deadline passes before its task can run

        asyncio.get_running_loop().call_soon(release_as_time_runs_out)
        results = await asyncio.gather(early, late, return_exceptions=True)
        assert results[1] == (200, b"ok")
        assert results[0] == (200, b"ok") or isinstance(results[0], UpstreamTimeout)
        assert up.accepted == 1 and pool.open_count == 1 and queued(pool) == 0


class _RequestState:
    """Stands for what a handler's frames hold while it waits: the request, its headers, a body."""


async def test_a_timed_out_waiter_keeps_nothing_of_its_request_alive() -> None:
    """An expired waiter stays queued (done) until the next wake-up; with the pool saturated that
    can be a long time (a hung or long-polling upstream). It must not keep the timed-out request's
    frames, and so its body and headers, alive all that time: memory would grow with every 504."""
    gate = asyncio.Event()
    async with (
        asyncio.timeout(LIMIT),
        setup(one_shot(gate), pool_size=1, pool_timeout=0.05) as (_up, pool),
    ):
        first = await get(pool, "/1")  # holds the only connection

        async def handler() -> weakref.ref[_RequestState]:
            state = _RequestState()
            with pytest.raises(UpstreamTimeout):
                await get(pool, "/2")
            return weakref.ref(state)

        refs = [await handler() for _ in range(3)]
        gc.collect()
        alive = sum(ref() is not None for ref in refs)
        gate.set()
        assert await first.read() == b"ok"
        first.release()
        assert alive == 0, f"{alive} timed-out requests still held by the pool's waiter queue"


async def test_pool_timeout_costs_nothing_when_a_connection_is_at_hand() -> None:
    """A deadline applied to the fast path (connect, reuse) would fail with this tiny budget."""
    async with (
        asyncio.timeout(LIMIT),
        setup(serve(response(200, b"hi")), pool_timeout=1e-9) as (
            up,
            pool,
        ),
    ):
        assert await fetch(pool) == (200, b"hi")  # a new connection
        assert await fetch(pool) == (200, b"hi")  # the idle one, reused
        assert up.accepted == 1


def test_pool_timeout_setting() -> None:
    assert config.Upstream(url="http://u.test").pool_timeout == 10.0
    with pytest.raises(ValidationError):
        config.Upstream(url="http://u.test", pool_timeout=0)
    example = yaml.safe_load((ROOT / "config" / "sidecrypt.example.yaml").read_text())
    assert example["upstream"]["pool_timeout"] == 10


# -- server.body_timeout on a streamed upload: the pool and iter_body ---------------------------


class Feed:
    """A client body the test hands out piece by piece (``readany`` like aiohttp's reader)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self.waiting = asyncio.Event()

    async def readany(self) -> bytes:
        self.waiting.set()
        item = await self.queue.get()
        self.waiting.clear()
        if isinstance(item, BaseException):
            raise item
        return item


def waits_for_the_body() -> Script:
    """Read the head and whatever body comes, never answer: the upstream waits for the rest."""

    async def script(conn: RawConn) -> None:
        conn.received += await conn.reader.readuntil(b"\r\n\r\n")
        while piece := await conn.reader.read(65536):  # recorded as it comes
            conn.received += piece
        conn.eof = True

    return script


@pytest.mark.parametrize("length", [None, 1000], ids=["chunked", "content-length"])
async def test_a_stalled_upload_is_refused_and_its_connection_aborted(length: int | None) -> None:
    feed = Feed()
    feed.queue.put_nowait(b"first piece")
    headers = [("Content-Length", str(length))] if length else []
    async with asyncio.timeout(LIMIT), setup(waits_for_the_body()) as (up, pool):
        with pytest.raises(RequestError) as info:
            await get(pool, method="POST", headers=headers, body=forward.iter_body(feed, 0.2))
        assert (info.value.status, info.value.code) == (408, "body_timeout")
        assert pool.open_count == 0 and pool.idle_count == 0
        await assert_closed_by_pool(up.connections[0])
        assert b"first piece" in up.connections[0].received


@pytest.mark.parametrize(
    "error",
    [ConnectionResetError("Connection lost"), TransferEncodingError("bad chunk b'secret'")],
    ids=["reset", "bad-framing"],
)
async def test_a_broken_client_body_becomes_a_400_without_its_text(error: Exception) -> None:
    feed = Feed()
    feed.queue.put_nowait(b"abc")
    feed.queue.put_nowait(error)
    chunks = []
    with pytest.raises(RequestError) as info:
        async for chunk in forward.iter_body(feed, 5.0):
            chunks.append(chunk)
    assert chunks == [b"abc"]
    assert (info.value.status, info.value.code) == (400, "bad_request_body")
    assert "secret" not in info.value.message


async def test_the_idle_limit_restarts_with_every_piece() -> None:
    """Each pause is short, the whole body is not: a total limit would refuse it."""
    feed = Feed()
    body = forward.iter_body(feed, 0.2)
    started = time.monotonic()
    got = []
    async with asyncio.timeout(LIMIT):
        for i in range(6):
            await asyncio.sleep(0.05)
            feed.queue.put_nowait(b"%d" % i)
            got.append(await anext(body))
        feed.queue.put_nowait(b"")
        assert [chunk async for chunk in body] == []
    assert got == [b"0", b"1", b"2", b"3", b"4", b"5"]
    assert time.monotonic() - started > 0.2  # the test's premise: longer than the limit


# -- through the proxy ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def proxied(
    proxy_factory: Any, script: Script, **settings: Any
) -> AsyncIterator[tuple[RawUpstream, str]]:
    server = settings.pop("server", {})
    async with RawUpstream(script) as up:
        proxy = await proxy_factory(
            {"upstream": {"url": up.url(), **settings}, "server": server}, tls=False
        )
        yield up, proxy.url
        assert not up.errors, up.errors


async def raw_exchange(url: str, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["error"]["code"]
    return code


def streaming(gate: asyncio.Event) -> Script:
    """A chunked 200 that the proxy streams: its last chunk waits for ``gate``."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
    return held(gate, head, b"0\r\n\r\n")


async def test_proxy_answers_504_json_when_no_connection_frees(proxy_factory: Any) -> None:
    gate = asyncio.Event()
    async with (
        asyncio.timeout(LIMIT),
        proxied(proxy_factory, streaming(gate), pool_size=1, pool_timeout=0.2) as (up, url),
        aiohttp.ClientSession() as s,
    ):
        slow = await s.get(url + "/slow")  # streamed to a slow client: the slot stays busy
        assert slow.status == 200
        async with s.get(url + "/next") as r:
            assert r.status == 504
            body = await r.read()
            assert error_code(body) == "upstream_pool_timeout"
            assert "upstream.pool_timeout" in json.loads(body)["error"]["message"]
        gate.set()
        assert await slow.read() == b"ok"
        slow.release()
        async with s.get(url + "/after") as r:  # the slot is free again
            assert (r.status, await r.read()) == (200, b"ok")
        assert up.accepted == 1


BIG = 300 * 1024  # past the 256 KiB a body is read whole: streamed


@pytest.mark.parametrize("framing", ["chunked", "large-length"])
async def test_proxy_answers_408_json_to_a_stalled_streamed_upload(
    proxy_factory: Any, framing: str
) -> None:
    head = "POST /up HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
    if framing == "chunked":
        data = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"5\r\nhello\r\n"
    else:
        data = (head + f"Content-Length: {BIG}\r\n\r\n").encode() + b"hello"
    async with (
        asyncio.timeout(LIMIT),
        proxied(proxy_factory, waits_for_the_body(), server={"body_timeout": 0.2}) as (up, url),
    ):
        reader, writer = await raw_exchange(url, data)
        try:
            status, _, body = await read_answer(reader)
        finally:
            writer.close()
        assert status == 408 and error_code(body) == "body_timeout"
        await assert_closed_by_pool(up.connections[0])  # aborted, never reused
        assert b"hello" in up.connections[0].received


def answers_before_the_body(head: bytes) -> Script:
    """Send ``head`` and part of a body at once, then wait for the upload to finish."""

    async def script(conn: RawConn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.send(head)
        await conn.read_until_eof()

    return script


@contextlib.asynccontextmanager
async def stalled_upload(
    proxy_factory: Any, script: Script
) -> AsyncIterator[tuple[Any, asyncio.StreamReader]]:
    """A chunked upload that sends one piece and stalls, through a proxy with a 0.2 s limit."""
    data = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with (
        asyncio.timeout(LIMIT),
        proxied(proxy_factory, script, server={"body_timeout": 0.2}) as (up, url),
    ):
        reader, writer = await raw_exchange(url, data)
        try:
            yield up, reader
        finally:
            writer.close()


async def test_proxy_answers_408_when_the_upstream_answered_but_the_client_has_nothing(
    proxy_factory: Any,
) -> None:
    """The upstream's head is in but its (small) body waits for the upload: nothing has gone to
    the client yet, so it gets the 408 rather than a 502 for the upstream."""
    script = answers_before_the_body(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!")
    async with stalled_upload(proxy_factory, script) as (up, reader):
        status, _, body = await read_answer(reader)
        assert status == 408 and error_code(body) == "body_timeout"
        await assert_closed_by_pool(up.connections[0])


async def test_proxy_cuts_a_started_response_when_the_upload_stalls(proxy_factory: Any) -> None:
    script = answers_before_the_body(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nbegun" % BIG)
    async with stalled_upload(proxy_factory, script) as (up, reader):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        rest = await reader.read()  # until the proxy cuts the connection
        assert rest == b"begun"  # short of the promised length: the client knows it is cut
        await assert_closed_by_pool(up.connections[0])


async def test_proxy_passes_a_slow_upload_that_keeps_moving(
    proxy_factory: Any, upstream: Any
) -> None:
    proxy = await proxy_factory(
        {"upstream": {"url": upstream.url}, "server": {"body_timeout": 0.5}}, tls=False
    )

    async def trickle() -> AsyncIterator[bytes]:
        for i in range(8):
            await asyncio.sleep(0.1)  # each pause well within the limit, the total past it
            yield bytes([i]) * 1000

    started = time.monotonic()
    async with (
        asyncio.timeout(LIMIT),
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/up", data=trickle()) as r,
    ):
        assert r.status == 200
        body = await r.read()
    assert time.monotonic() - started > 0.5  # the test's premise: longer than body_timeout
    assert body == upstream.seen[0].body == b"".join(bytes([i]) * 1000 for i in range(8))


async def test_bad_chunk_framing_mid_upload_ends_the_upload(
    proxy_factory: Any, proxy_engine: str
) -> None:
    """A malformed chunk header mid-upload: the lean engine fails the body at once (400); on
    aiohttp's engine the C parser neither ends nor fails the body it was reading (it queues its
    own 400 for after the handler), so only the idle limit ends it (408). Either way a JSON
    answer first and the upstream connection aborted."""
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with (
        asyncio.timeout(LIMIT),
        proxied(proxy_factory, waits_for_the_body(), server={"body_timeout": 0.2}) as (up, url),
    ):
        reader, writer = await raw_exchange(url, head)
        try:
            await until(
                lambda: up.accepted > 0 and b"hello" in up.connections[0].received, "upload"
            )
            writer.write(b"zz-not-hex\r\n")
            status, _, body = await read_answer(reader)
        finally:
            writer.close()
        want = (400, "bad_request_body") if proxy_engine == "lean" else (408, "body_timeout")
        assert (status, error_code(body)) == want
        await assert_closed_by_pool(up.connections[0])


async def test_a_client_gone_mid_upload_aborts_the_upstream_connection(
    proxy_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with (
        asyncio.timeout(LIMIT),
        proxied(proxy_factory, waits_for_the_body(), server={"body_timeout": 30}) as (up, url),
    ):
        _, writer = await raw_exchange(url, head)
        await until(lambda: up.accepted > 0 and b"hello" in up.connections[0].received, "upload")
        writer.close()
        await assert_closed_by_pool(up.connections[0])
        assert not up.connections[0].requests
    assert not [r for r in caplog.records if r.name == "aiohttp.server"], caplog.text


# -- on uvloop (sidecrypt's production loop) -----------------------------------------------------


@pytest.mark.parametrize("scenario", ["pool-timeout", "handoff", "stalled-upload"])
def test_on_uvloop(scenario: str) -> None:
    run: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
        "pool-timeout": test_a_request_waits_for_a_slot_at_most_pool_timeout,
        "handoff": test_a_timed_out_waiter_leaves_the_slot_to_the_next_one,
        "stalled-upload": lambda: test_a_stalled_upload_is_refused_and_its_connection_aborted(None),
    }
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run[scenario]())
