"""The lean engine: the proxy's client connections without aiohttp's per-request machinery.

aiohttp's server builds a ``web.Request``, a task, a ``StreamWriter`` and a prepared
``web.Response`` for every request, and walks ``finish_response``; under the bench's load that
is ~40 µs of the ~125 µs a pass-through request costs (bench/PROFILE.md, round 4). This engine
keeps the parts that decide what is accepted and drops the rest:

- parsing is aiohttp's C parser (llhttp) with the same limits, so what is refused as malformed
  or smuggled is exactly what the aiohttp engine refuses (400, connection closed);
- the handler gets an :class:`~sidecrypt.proxy.incoming.Incoming` (the ``RequestView`` both
  engines offer) and returns the same ``web.Response``/``StreamResponse`` objects; a plain
  ``web.Response`` is written in one go, anything else through aiohttp's own ``prepare()``;
- one task per connection serves its requests in order (pipelining included, at most
  ``MAX_PIPELINED`` parsed ahead); losing the connection cancels the handler;
- ``Expect: 100-continue`` is answered before the handler runs (other expectations get 417),
  upgrades are answered and the connection closed, an unread body is drained for at most
  ``LINGERING_TIME`` before the connection is reused, an idle connection (or one whose request
  head never completes) closes after ``server.keepalive_timeout``, and shutdown lets requests
  in flight finish within ``server.grace_period``.

``server.engine: aiohttp`` serves through aiohttp instead; it is also used when a plugin added
middlewares, routes or response signals to the proxy app, or when the access log is on.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time
from aiohttp.http import (
    HttpProcessingError,
    HttpRequestParser,
    HttpVersion10,
    HttpVersion11,
    RawRequestMessage,
    StreamWriter,
)
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_protocol import RequestPayloadError

from .incoming import Incoming, RequestView, base_request
from .send_timeout import SendTimeout

log = logging.getLogger(__name__)

Handler = Callable[[RequestView], Awaitable[web.StreamResponse]]
READ_BUFSIZE = 2**16
MAX_PIPELINED = 16  # requests the parser holds parsed before it stops (pipelining)
PAUSE_AT = MAX_PIPELINED // 2  # queued requests at which the socket is no longer read
# As aiohttp: how long an unread body is drained so the client sees the answer, not a reset.
LINGERING_TIME = 10.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_Item = tuple[RawRequestMessage | HttpProcessingError, StreamReader]


class FrontServer(web.Server):
    """The runner's server when the lean engine is on: makes :class:`Connection` protocols."""

    def __init__(
        self,
        handler: Handler,
        app: web.Application,
        *,
        max_field_size: int,
        keepalive_timeout: float,
        send_timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(handler, loop=loop)
        self.handler = handler
        self.app = app
        self.max_field_size = max_field_size
        self.keepalive_timeout = keepalive_timeout
        self.send_timeout = send_timeout
        self.conns: set[Connection] = set()

    def __call__(self) -> Connection:  # type: ignore[override]
        return Connection(self)

    def pre_shutdown(self) -> None:
        for conn in list(self.conns):
            conn.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        await asyncio.gather(*(conn.shutdown(timeout) for conn in list(self.conns)))
        self.conns.clear()


class Connection(SendTimeout):
    """One client connection; see the module docstring for what it keeps and drops.

    A client that leaves its answer unread past ``server.send_timeout`` is disconnected
    (:class:`~sidecrypt.proxy.send_timeout.SendTimeout`).
    """

    def __init__(self, server: FrontServer) -> None:
        loop = server._loop
        parser = HttpRequestParser(
            self,
            loop,
            READ_BUFSIZE,
            max_line_size=8190,
            max_field_size=server.max_field_size,
            max_headers=128,
            payload_exception=RequestPayloadError,
            auto_decompress=False,  # bodies pass through as sent
            max_msg_queue_size=MAX_PIPELINED,
        )
        super().__init__(loop, parser)
        self._server = server
        self._init_send_timeout(server.send_timeout)
        self._messages: deque[_Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._context = contextvars.copy_context()
        self._idle: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0
        self._current: StreamReader | None = None  # the body of the request being served
        self._closing = False  # serve no request after those already queued
        self._stopped = False  # parse nothing more: after a malformed head or an upgrade
        self.peername: Any = None
        self.secure = False

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # As aiohttp: TCP keepalive notices peers that vanished without a FIN.
        tcp_keepalive(cast(asyncio.Transport, transport))
        self.peername = transport.get_extra_info("peername")
        self.secure = transport.get_extra_info("sslcontext") is not None
        self._server.conns.add(self)
        self._arm_idle()
        self._task = self._loop.create_task(self._serve())

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.conns.discard(self)
        self._closing = self._stopped = True
        self._parser = None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._fail_bodies(ConnectionResetError("the client connection was lost"))
        self._messages.clear()
        if self._task is not None:
            self._task.cancel()  # the handler stops where it is: nobody is left to answer
            self._task = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def resume_reading(self, resume_parser: bool = True) -> None:
        """The body reader asks after every chunk it hands out; only a paused reader needs it."""
        if self._reading_paused:
            super().resume_reading(resume_parser)

    def data_received(self, data: bytes) -> None:
        if self._stopped or self._parser is None:
            return
        try:
            messages, upgraded, _ = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            # Nothing after a malformed head can be trusted. A body cut by bad framing fails now
            # rather than at body_timeout, and its request's handler answers (400); only an
            # error between requests gets an answer of its own.
            self._stopped = True
            messages = [] if self._fail_bodies(exc) else [(exc, EMPTY_PAYLOAD)]
            upgraded = False
        if upgraded:  # the upgrade request's body is complete; what follows is not ours to read
            self._stopped = True
        if messages and self._closing:
            # Nothing parsed from now on is served, and every earlier body is complete: stop
            # parsing and reading, so a flood cannot pile up in the parser's held-back tail.
            self._stopped = True
            self._pause_reading_for_buffer()
        elif messages:
            for i, (message, _) in enumerate(messages):
                if isinstance(message, RawRequestMessage) and message.upgrade:
                    # Not proxied: answered as a plain request, and the last one (aiohttp's
                    # parser drops what followed some upgrade requests in the same read).
                    messages = messages[: i + 1]
                    self._closing = True
                    break
            self._messages.extend(messages)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
            if len(self._messages) >= PAUSE_AT and not self._buffer_paused:
                self._pause_reading_for_buffer()
        if self._stopped:
            self._closing = True

    def _fail_bodies(self, exc: BaseException) -> bool:
        """Fail every body still being received; whether there was one."""
        failed = False
        for payload in (self._current, *(p for _, p in self._messages)):
            if payload is not None and not payload.is_eof():
                payload.set_exception(exc)
                failed = True
        return failed

    def _drained(self) -> None:
        """Room in the queue again. The parser stops at MAX_PIPELINED requests in flight and
        keeps the rest of what it was given: parse that, then read from the socket again."""
        self.data_received(b"")
        if len(self._messages) < PAUSE_AT and not self._stopped:
            self._resume_reading_for_buffer()

    # -- serving ---------------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self.transport is not None:
                if not self._messages:
                    if self._closing:
                        break
                    self._waiter = self._loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                message, payload = self._messages.popleft()
                if isinstance(message, HttpProcessingError):
                    status = message.code if 400 <= message.code < 500 else 400
                    await self._write(_error(status, "bad_request", "malformed request"))
                    break
                self._current = payload
                try:
                    request = Incoming(message, payload, self, self._server.app)
                    # Each request in a context of its own, as aiohttp does: a plugin's
                    # ContextVar (a principal, a trace id) must not leak into the next one.
                    task = self._loop.create_task(
                        self._exchange(request), context=self._context.copy()
                    )
                    keep_alive = await task
                    if not payload.is_eof():  # answered before its body was read: drain it
                        keep_alive = await _linger(payload) and keep_alive
                finally:
                    self._current = None
                if self._parser is not None:  # only now: the parser counts complete messages
                    self._parser.message_consumed()
                if self._buffer_paused and len(self._messages) < PAUSE_AT:
                    self._drained()
                # Nothing of this request outlives it while the connection idles (its headers
                # carry credentials, its state the caller's principal).
                message = payload = request = task = None  # type: ignore[assignment]
                if not keep_alive:
                    break
                self._arm_idle()
        except asyncio.CancelledError:
            pass
        except ConnectionError:  # the client went away while an error answer was written
            pass
        except Exception:  # a bug here must close one connection, not leave it hanging
            log.exception("client connection failed")
        finally:
            self._close_transport()

    async def _exchange(self, request: Incoming) -> bool:
        """One request and its answer; whether the connection may carry another."""
        expect = request.version == HttpVersion11 and hdrs.EXPECT in request.headers
        if expect and not await self._expect(request):
            return False
        try:
            resp = await self._server.handler(request)
            if not isinstance(resp, web.StreamResponse):
                raise TypeError(f"the handler returned {type(resp).__name__}, not a response")
        except web.HTTPException as exc:
            resp = exc
        except Exception as exc:
            log.error("the request handler failed", exc_info=exc)
            return await self._failed(request, exc)
        try:
            if type(resp) is web.Response and not resp.prepared and _one_write(resp):
                return await self._send(request, resp)
            await resp.prepare(base_request(request))
            await resp.write_eof()
        except ConnectionError:
            return False
        except Exception as exc:  # e.g. a header aiohttp refuses to write (CR/LF)
            # Its type only: a serialiser's message may quote a header value.
            log.error("the answer could not be written", extra={"error": type(exc).__name__})
            return await self._failed(request, exc)
        writer = request._writer
        if (
            request.version == HttpVersion10
            and writer is not None
            and writer.length is None
            and not must_be_empty_body(request.method, resp.status)
        ):
            return False  # an HTTP/1.0 answer without a length ends when the connection does
        return bool(resp.keep_alive) and not self.closing()

    async def _failed(self, request: Incoming, exc: Exception) -> bool:
        """No answer could be given: 500 (504 for a timeout), or only a close once one began."""
        writer = request._writer
        if writer is not None and writer.output_size:  # an answer began: a second would desync
            return False
        if isinstance(exc, TimeoutError):
            await self._write(_error(504, "timeout", "the proxy timed out", request.method))
            return False
        await self._write(_error(500, "internal_error", "the proxy failed", request.method))
        return False

    async def _expect(self, request: Incoming) -> bool:
        if request.headers[hdrs.EXPECT].lower() == "100-continue":
            if self.transport is not None:
                self.transport.write(CONTINUE)
            return True
        expectation = "only 100-continue is supported"
        await self._write(_error(417, "expectation_failed", expectation, request.method))
        return False

    async def _send(self, request: Incoming, resp: web.Response) -> bool:
        """A plain ``web.Response`` in one write, with the headers aiohttp's prepare() adds."""
        body: bytes = resp.body  # type: ignore[assignment]  # _one_write checked it
        status = resp.status
        method = request.method
        headers = resp.headers
        if must_be_empty_body(method, status):
            if status < 200 or status == 204:
                headers.popall(hdrs.CONTENT_LENGTH, None)
            elif body and hdrs.CONTENT_LENGTH not in headers:  # HEAD: what a GET would get
                headers[hdrs.CONTENT_LENGTH] = str(len(body))
            headers.popall(hdrs.TRANSFER_ENCODING, None)
            body = b""
        elif hdrs.CONTENT_LENGTH not in headers:
            headers[hdrs.CONTENT_LENGTH] = str(len(body))
        elif headers[hdrs.CONTENT_LENGTH] != str(len(body)):
            raise ValueError("Content-Length does not match the body")
        if body:
            headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
        if hdrs.DATE not in headers:
            headers[hdrs.DATE] = rfc822_formatted_time()
        keep_alive = resp.keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        keep_alive = keep_alive and not self.closing()
        version = request.version
        if hdrs.CONNECTION not in headers:
            if keep_alive and version == HttpVersion10:
                headers[hdrs.CONNECTION] = "keep-alive"
            elif not keep_alive and version == HttpVersion11:
                headers[hdrs.CONNECTION] = "close"
        line = f"HTTP/{version.major}.{version.minor} {status} {resp.reason}"
        head = _serialize_headers(line, headers)  # refuses CR/LF in the status line and headers
        await self._write(head + body)
        return keep_alive

    def closing(self) -> bool:
        """This answer is the connection's last: it is shutting down or read its last request."""
        return self._closing and not self._messages

    async def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        transport.write(data)
        if self._paused:  # the client reads slowly: wait before the next answer piles up
            await self._drain_helper()

    def payload_writer(self) -> StreamWriter:
        return StreamWriter(self, self._loop)

    # -- timers and shutdown ---------------------------------------------------------------------

    def _arm_idle(self) -> None:
        """Idle from now on. One timer per connection, moved lazily rather than re-made per
        request (a TimerHandle each time cost ~1 µs)."""
        self._idle_deadline = self._loop.time() + self._server.keepalive_timeout
        if self._idle is None:
            self._idle = self._loop.call_at(self._idle_deadline, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        if self.transport is None:
            return
        if self._current is not None or self._messages:  # busy: look again a timeout later
            self._arm_idle()
        elif self._loop.time() < self._idle_deadline:  # used since: wait for the new deadline
            self._idle = self._loop.call_at(self._idle_deadline, self._idle_expired)
        else:
            self._close_transport()

    def close(self) -> None:
        """Serve no new request; close now if idle (shutdown's first step)."""
        self._closing = True
        if self._current is None and not self._messages:
            self._close_transport()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def shutdown(self, timeout: float | None) -> None:
        """Wait at most ``timeout`` for the request in flight, then cut the connection."""
        self.close()
        task = self._task
        if task is not None and not task.done():
            _, pending = await asyncio.wait([task], timeout=timeout)
            if pending:
                task.cancel()
        self._close_transport()

    def _close_transport(self) -> None:
        """Close once what was written has gone out; a client that never takes it in is cut
        after ``server.send_timeout`` (SendTimeout)."""
        if self.transport is not None:
            self.transport.close()
            self._watch_send()


def _one_write(resp: web.Response) -> bool:
    """Whether :meth:`Connection._send` can write it: bytes, no coding, no cookie jar."""
    return (
        isinstance(resp.body, bytes)
        and not resp.chunked
        and not resp.compression
        and not getattr(resp, "_cookies", None)
    )


async def _linger(payload: StreamReader) -> bool:
    """Read and drop a body nobody read, so the client sees the answer before the close."""
    try:
        async with asyncio.timeout(LINGERING_TIME):
            while not payload.is_eof():
                await payload.readany()
    except (TimeoutError, Exception):
        return False
    return True


def _error(status: int, code: str, message: str, method: str = "") -> bytes:
    """A JSON error answer the handler did not give; the connection closes after it."""
    body = b'{"error":{"code":"%s","message":"%s"}}' % (code.encode(), message.encode())
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Date: {rfc822_formatted_time()}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + (b"" if method == "HEAD" else body)


_REASONS = {
    400: "Bad Request",
    413: "Request Entity Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    504: "Gateway Timeout",
}


def install(runner: web.AppRunner, handler: Handler, settings: Any) -> FrontServer:
    """Serve ``runner``'s connections with the lean engine (after ``runner.setup()``, before
    any site starts). ``runner.cleanup()`` still drains and stops them."""
    base = runner.server
    assert base is not None, "call after runner.setup()"
    server = FrontServer(
        handler,
        runner.app,
        max_field_size=settings.server.max_header_size,
        keepalive_timeout=settings.server.keepalive_timeout,
        send_timeout=settings.server.send_timeout,
        loop=base._loop,
    )
    runner._server = server
    return server
