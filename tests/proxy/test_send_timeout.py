"""``server.send_timeout``: a client that leaves its answer unread is disconnected.

Before it, a client that never read held its connection, its handler and (for a streamed answer)
an upstream connection for ever: a slow-read attack on the pool. Real sockets throughout; the
client's receive buffer is made small so that "not reading" fills the proxy's buffers quickly.
Every wait is bounded by ``asyncio.timeout``: a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from tests.conftest import Certs
from tests.proxy.raw_upstream import RawConn, RawUpstream, Script, response, until

from sidecrypt import config
from sidecrypt.proxy import send_timeout, server

LIMIT = 10.0  # no step of a passing test comes near this: reaching it means a hang
PIECE = 64 * 1024
CANARY = "canary-7c1e9b"  # in the request target and a header: must not reach the log


def endless(cut: asyncio.Event) -> Script:
    """A chunked answer that never ends; ``cut`` is set once the proxy drops the connection."""

    async def script(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (PIECE, b"x" * PIECE)
        try:
            while True:
                await conn.send(chunk)
        except ConnectionError:
            cut.set()
            raise

    return script


def fixed(size: int) -> Script:
    """Every request answered with ``size`` bytes of body (Content-Length)."""
    answer = response(200, b"y" * size, headers=(("Content-Type", "application/octet-stream"),))

    async def script(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await conn.send(answer)

    return script


async def open_client(
    url: str, ctx: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection with a small receive buffer (and a small stream buffer)."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", int(port)))
    return await asyncio.open_connection(
        sock=sock, ssl=ctx, server_hostname=host if ctx else None, limit=4096
    )


async def read_to_the_end(reader: asyncio.StreamReader) -> int:
    """Bytes read until the proxy's close (EOF or reset)."""
    total = 0
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while piece := await reader.read(PIECE):
            total += len(piece)
    return total


def request(path: str = "/big") -> bytes:
    return f"GET {path}/{CANARY} HTTP/1.1\r\nHost: x\r\nX-Secret: {CANARY}\r\n\r\n".encode()


StartProxy = Callable[[dict[str, Any], bool], Awaitable[str]]


async def never_reads_a_streamed_answer(start: StartProxy, ctx: ssl.SSLContext | None) -> None:
    cut = asyncio.Event()
    async with asyncio.timeout(LIMIT), RawUpstream(endless(cut)) as up:
        url = await start(
            {"upstream": {"url": up.url()}, "server": {"send_timeout": 0.3}}, ctx is not None
        )
        reader, writer = await open_client(url, ctx)
        writer.write(request())
        await cut.wait()  # the proxy aborted the upstream connection: its slot is free
        await read_to_the_end(reader)  # and the client's connection is closed
        writer.close()


async def test_a_client_that_never_reads_a_streamed_answer_is_disconnected(
    proxy_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def start(raw: dict[str, Any], tls: bool) -> str:
        return str((await proxy_factory(raw, tls=tls)).url)

    with caplog.at_level(logging.INFO, logger="sidecrypt"):
        await never_reads_a_streamed_answer(start, None)
    records = [r for r in caplog.records if r.name == "sidecrypt.proxy.send_timeout"]
    assert records and records[0].send_timeout == 0.3
    assert CANARY not in caplog.text  # neither the target nor the headers are logged


async def test_a_client_that_never_reads_whole_answers_is_disconnected(
    proxy_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Answers written in one go (bodies up to 256 KiB), pipelined and left unread."""
    async with asyncio.timeout(LIMIT), RawUpstream(fixed(200_000)) as up:
        proxy = await proxy_factory(
            {"upstream": {"url": up.url()}, "server": {"send_timeout": 0.3}}, tls=False
        )
        reader, writer = await open_client(proxy.url, None)
        with caplog.at_level(logging.INFO, logger="sidecrypt"):
            writer.write(request() * 64)  # 12.8 MB of answers: more than any buffer holds
            await until(
                lambda: any(r.name == "sidecrypt.proxy.send_timeout" for r in caplog.records),
                "the proxy gives up on the client",
                timeout=LIMIT,
            )
        received = await read_to_the_end(reader)
        assert received < 64 * 200_000
        writer.close()


async def test_a_slow_client_that_keeps_reading_gets_all_of_it(proxy_factory: Any) -> None:
    """The timeout bounds each stall, not the whole answer."""
    size = 2 * 1024 * 1024
    async with asyncio.timeout(LIMIT), RawUpstream(fixed(size)) as up:
        proxy = await proxy_factory(
            {"upstream": {"url": up.url()}, "server": {"send_timeout": 0.5}}, tls=False
        )
        reader, writer = await open_client(proxy.url, None)
        started = time.monotonic()
        writer.write(request())
        await reader.readuntil(b"\r\n\r\n")
        got = 0
        while got < size:
            piece = await reader.read(PIECE)
            assert piece, "the proxy closed the connection of a client that kept reading"
            got += len(piece)
            await asyncio.sleep(0.02)
        assert time.monotonic() - started > 0.5  # the test's premise: longer than the timeout
        writer.close()


def test_the_setting_defaults_to_nginx_s_60_seconds() -> None:
    settings = config.parse({"upstream": {"url": "http://127.0.0.1:1"}}, file="t.yaml")
    assert settings.server.send_timeout == 60.0


@pytest.mark.parametrize("engine", ["lean", "aiohttp"])
def test_never_reading_over_tls_on_uvloop(certs: Certs, engine: str) -> None:
    """sidecrypt's production loop and its TLS transport, which does its own flow control."""

    async def scenario() -> None:
        stops = []

        async def start(raw: dict[str, Any], tls: bool) -> str:
            raw["listen"] = {
                "address": "127.0.0.1:0",
                "tls": {"cert": str(certs.server_cert), "key": str(certs.server_key)},
            }
            raw["admin"] = {"address": None}
            raw["server"]["engine"] = engine
            settings = config.parse(raw, file="t.yaml", base_dir=certs.dir)
            running, stop = await server.start(settings)
            stops.append(stop)
            return f"https://localhost:{running.addresses()[0][1]}"

        try:
            await never_reads_a_streamed_answer(start, certs.client_context())
        finally:
            for stop in stops:
                await stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_aiohttp_s_engine_keeps_the_runner_s_settings(proxy_factory: Any) -> None:
    """install() re-makes aiohttp's server: the handler and its settings must survive."""
    async with RawUpstream(fixed(10)) as up:
        proxy = await proxy_factory(
            {
                "upstream": {"url": up.url()},
                "server": {"engine": "aiohttp", "keepalive_timeout": 7.5, "send_timeout": 2.5},
            },
            tls=False,
        )
    bound = proxy.running.runners[0].server
    assert isinstance(bound, send_timeout.BoundedServer)
    assert bound.send_timeout == 2.5
    assert bound._kwargs["keepalive_timeout"] == 7.5
    assert bound.handler_cancellation
    assert type(bound()).__name__ == "BoundedRequestHandler"
