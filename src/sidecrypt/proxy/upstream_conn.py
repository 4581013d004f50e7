"""One upstream connection: an asyncio protocol feeding llhttp, carrying one exchange at a time.

State is plain attributes reset per exchange, and waiting is one future at a time with a lazy
read timer (kept across waits and exchanges, rescheduled only when it fires early), so the
common case (the whole response in one read) costs one future per request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import cast

import httptools
from aiohttp import hdrs
from multidict import CIMultiDict

from ..errors import RequestError, UpstreamError, UpstreamTimeout

MAX_HEAD = 64 * 1024
HIGH_WATER = 256 * 1024  # buffered response bytes before reading from the upstream pauses
LOW_WATER = 64 * 1024
SMALL_WRITE = 256 * 1024  # a head and a body up to this size go out in one write


class ClientBodyFailed(UpstreamError):
    """The client's body failed (stalled, broken) after the upstream began to answer.

    The exchange is void and its connection aborted. An UpstreamError, so a response already
    streaming to the client is cut as for any upstream failure; one not yet started gets the
    client's own status and code (a 408 ``body_timeout``, say), not a 502.
    """

    def __init__(self, cause: RequestError) -> None:
        super().__init__(cause.message, code=cause.code)
        self.status = cause.status


class Connection(asyncio.Protocol):
    """Fields are public where the pool reads them; everything else is this exchange's state."""

    def __init__(self, read_timeout: float, on_lost: Callable[[Connection], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._read_timeout = read_timeout
        self._on_lost = on_lost
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self.requests = 0
        self.idle_since: float | None = None
        self.closed = False
        self.nothing_received = True
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self._busy = False
        self._exc: UpstreamError | None = None
        self._raw: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._head_bytes_raw = 0
        self._head_done = False
        self._head_only = False
        self._informational = False
        self._until_eof = False
        self._complete = False
        self._keep_alive = False
        self._sent = False
        self._answered_early = False
        self._since_body = 0
        self._body_seen = False
        self._upload: asyncio.Task[None] | None = None
        self._upload_error: BaseException | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0

    # -- what the pool asks -----------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and self._transport is not None and not self._transport.is_closing()

    def reusable(self) -> bool:
        """Only a connection whose exchange ended cleanly may carry another request."""
        return (
            self._complete
            and self._keep_alive
            and self._sent
            and not self._answered_early
            and self._exc is None
            and not self._chunks
            and self.usable
        )

    def park(self, now: float) -> None:
        """Idle in the pool from ``now``: any byte the upstream sends from here is an error."""
        self._busy = False
        self.idle_since = now

    def close(self, *, graceful: bool = False) -> None:
        """Abort unless ``graceful`` (an idle, clean connection): a connection thrown away
        mid-exchange must not linger flushing a body to an upstream that stopped reading."""
        if self._upload is not None:
            self._upload.cancel()
        self._busy = False
        self.idle_since = None
        self._cancel_timer()
        if self._transport is not None and not self._transport.is_closing():
            if graceful:
                self._transport.close()
            else:
                self._transport.abort()

    def send(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        declared: int | None,
        *,
        head_only: bool,
    ) -> None:
        """Write one request; a streamed body goes on in a task of its own (:meth:`_upload_body`).

        The upstream may answer before the body is sent (a 401 or 413 while the client is still
        uploading, or stalled): its answer must reach the client then, as it would without us.
        """
        assert self._transport is not None
        self._start(head_only)
        transport = self._transport
        if body is None:
            transport.write(head)
        elif isinstance(body, bytes):
            if len(body) <= SMALL_WRITE:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
        else:
            transport.write(head)
            self._upload = self._loop.create_task(self._upload_body(body, declared))
            self._upload.add_done_callback(self._upload_done)
            return
        self._sent = True

    async def wait_head(self) -> None:
        while not self._head_done:
            if self._upload_error is not None:
                raise self._upload_error
            if self._exc is not None:
                raise self._exc
            await self._wait()

    async def read_chunk(self) -> bytes:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._reading_paused and self._buffered <= LOW_WATER and self._transport:
                    self._reading_paused = False
                    self._transport.resume_reading()
                return chunk
            if self._complete:
                return b""
            if self._exc is not None:
                raise self._exc
            await self._wait()

    def take_body(self) -> bytes | None:
        """The whole body if all of it has arrived (small answers nearly always have), else
        None: no wait and no chunk-by-chunk walk for the common case."""
        if not self._complete or self._exc is not None:
            return None
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused and self._transport:
            self._reading_paused = False
            self._transport.resume_reading()
        return body

    # -- internals --------------------------------------------------------------------------

    def _start(self, head_only: bool) -> None:
        self.requests += 1
        self.idle_since = None
        self.nothing_received = True
        self._busy = True
        self._head_done = self._complete = self._sent = self._informational = False
        self._answered_early = False
        self._since_body = 0
        self._keep_alive = self._until_eof = False
        self._head_only = head_only
        self._upload_error = None
        self._head_bytes_raw = 0
        self._last_read = self._loop.time()

    async def _upload_body(self, body: AsyncIterator[bytes], declared: int | None) -> None:
        if await self._stream(body, declared):
            self._sent = True
            self._last_read = self._loop.time()  # the read timeout counts from the request's end

    def _upload_done(self, task: asyncio.Task[None]) -> None:
        if task is not self._upload or task.cancelled():
            return
        self._upload = None
        exc = task.exception()
        if exc is not None:  # the client's body failed, or the upstream stopped reading it
            self._upload_error = exc  # raised as is by wait_head: the answer has not begun
            if isinstance(exc, RequestError):
                self._fail(ClientBodyFailed(exc))
            else:
                self._fail(UpstreamError("the request body could not be sent"))

    async def _stream(self, body: AsyncIterator[bytes], declared: int | None) -> bool:
        """Send a streamed body; False if the upstream answered and stopped reading, or left."""
        assert self._transport is not None
        sent = 0
        async for chunk in body:
            if self.closed or self._exc is not None:
                return False
            if not chunk:
                continue
            sent += len(chunk)
            if declared is None:
                self._transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            elif sent > declared:
                raise RequestError("the request body is longer than its Content-Length")
            else:
                self._transport.write(chunk)
            if self._write_paused:
                try:
                    await self._wait_writable()
                except UpstreamTimeout:
                    if self._head_done:  # answered and reads no more: stop, keep the answer
                        return False
                    raise
                if self._complete:  # answered in full while we were uploading
                    return False
        if declared is None:
            self._transport.write(b"0\r\n\r\n")
        elif sent != declared:
            raise RequestError("the request body is shorter than its Content-Length")
        return True

    async def _wait_writable(self) -> None:
        self._drain = self._loop.create_future()
        try:
            async with asyncio.timeout(self._read_timeout):
                await self._drain
        except TimeoutError:
            raise UpstreamTimeout("the upstream stopped reading the request body") from None
        finally:
            self._drain = None

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        if self._timer is None:
            # Left armed after the wait: the deadline only moves later, so a timer armed for an
            # earlier one fires early and re-arms (_on_timer) rather than being made per wait.
            self._timer = self._loop.call_at(self._last_read + self._read_timeout, self._on_timer)
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # nobody waits: the next wait arms a timer of its own
        deadline = self._last_read + self._read_timeout
        if self._upload is not None:  # still uploading: _wait_writable bounds a stalled upstream
            deadline = max(deadline, self._loop.time() + self._read_timeout)
        if self._loop.time() < deadline:  # data arrived since the timer was set
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._fail(UpstreamTimeout("the upstream did not answer in time"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: UpstreamError) -> None:
        if self._exc is None:
            self._exc = exc
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # not TCP: nothing to tune
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        if not self._busy:  # bytes nobody asked for: the connection is out of step
            self.closed = True
            self._fail(UpstreamError("the upstream sent data outside a response"))
            return
        self.nothing_received = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(self._exc or UpstreamError("the upstream sent a malformed response"))
            return
        if not self._head_done:
            # llhttp hands over a header only once it is complete: count the raw bytes too, or
            # one endless header line would grow without bound.
            self._head_bytes_raw += len(data)
            if self._head_bytes_raw > MAX_HEAD:
                self._fail(UpstreamError("the upstream response head is larger than 64 KiB"))
                return
        elif not self._complete:
            # Chunk framing, extensions and trailers are buffered by llhttp too: bound the bytes
            # that arrive without any body progress.
            if self._body_seen:
                self._body_seen = False
                self._since_body = 0
            else:
                self._since_body += len(data)
                if self._since_body > MAX_HEAD:
                    self._fail(UpstreamError("the upstream sent over 64 KiB of body framing"))
                    return
        elif self._drain is not None and not self._drain.done():
            self._drain.set_result(None)  # a complete early answer ends the upload (_stream)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self._busy and not self._complete and self._exc is None:
            if self._head_done and self._until_eof and exc is None:
                self._complete = True  # a body delimited by the end of the connection
            elif self._head_done:
                self._exc = UpstreamError("the upstream closed the connection mid-response")
            else:
                self._exc = UpstreamError("the upstream closed the connection before answering")
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second response to one request: out of step
            self._exc = UpstreamError("the upstream sent more than one response")
            raise self._exc
        self._raw = []
        self._head_bytes = 0
        self.reason = ""

    def on_status(self, status: bytes) -> None:
        self._head_bytes += len(status)
        self.reason += status.decode("latin-1")  # may arrive in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # trailers are not forwarded
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD:
            self._exc = UpstreamError("the upstream response head is larger than 64 KiB")
            raise self._exc
        self._raw.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                self._exc = UpstreamError("the upstream switched protocols; not supported")
                raise self._exc
            self._informational = True  # 100, 103: the final response follows
            return
        self.status = status
        self.headers = headers = CIMultiDict(self._raw)
        self._head_done = True
        self._answered_early = not self._sent  # the rest of the upload is not in step: no reuse
        if self._head_only:  # HEAD: no body whatever the head says; llhttp cannot be told
            self._complete = True
        elif status not in (204, 304):
            codings = ",".join(headers.getall(hdrs.TRANSFER_ENCODING, ())).lower().split(",")
            chunked = codings[-1].strip() == "chunked"
            self._until_eof = not chunked and hdrs.CONTENT_LENGTH not in headers

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            return
        self._body_seen = True
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._reading_paused and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._head_only:
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
