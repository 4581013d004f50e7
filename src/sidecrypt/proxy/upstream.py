"""A lean HTTP/1.1 connection pool to the one upstream: asyncio protocols and llhttp (httptools).

Why not aiohttp's ClientSession: the bench profile (bench/PROFILE.md) put ~45 µs of every proxied
request in its machinery (tracing hooks, cookie and URL handling, payload wrapping, per-request
timers), none of which a proxy talking to one fixed origin needs. The guarantees stay: verified
TLS, keep-alive reuse, connect and read timeouts, a bounded response head, backpressure both
ways, and a connection goes back to the pool only in a clean state (request fully sent, response
fully read, keep-alive allowed). The pool owns the message framing: it sets Content-Length or
chunked encoding itself, so a caller's header can never desynchronise the connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from aiohttp import hdrs
from multidict import CIMultiDictProxy
from yarl import URL

from ..errors import UpstreamError, UpstreamTimeout
from . import tls, tls_reload
from .upstream_conn import Connection

if TYPE_CHECKING:
    from ..config import Upstream

IDLE_SECONDS = 30.0  # an idle connection older than this is closed rather than reused
# Safe to send again on a fresh connection when a reused one died before answering (as Go does).
REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE", "CONNECT"})
FRAMING = frozenset({"content-length", "transfer-encoding"})


class UpstreamResponse:
    """The status and head of one upstream response; the body is read from the connection."""

    __slots__ = ("_conn", "_pool", "_released", "headers", "reason", "status")

    def __init__(self, pool: UpstreamPool, conn: Connection) -> None:
        self._pool = pool
        self._conn = conn
        self._released = False
        self.status = conn.status
        self.reason = conn.reason
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(conn.headers)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get(hdrs.CONTENT_LENGTH)
        return int(value) if value is not None and value.isascii() and value.isdigit() else None

    @property
    def content_type(self) -> str:
        raw = self.headers.get(hdrs.CONTENT_TYPE)
        if not raw:
            return "application/octet-stream"
        return raw.partition(";")[0].strip().lower()

    async def readany(self) -> bytes:
        """The next piece of the body; b"" once it is complete."""
        if self._released:
            raise UpstreamError("the upstream response was already released")
        return await self._conn.read_chunk()

    def take_body(self) -> bytes | None:
        """The whole body if all of it has arrived, else None (read it then)."""
        return None if self._released else self._conn.take_body()

    async def read(self) -> bytes:
        if (body := self.take_body()) is not None:
            return body
        chunks = []
        while chunk := await self.readany():
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def release(self) -> None:
        """Back to the pool if clean, closed otherwise. Safe to call more than once."""
        if not self._released:
            self._released = True
            self._pool.release(self._conn)


class UpstreamPool:
    """Keep-alive connections to one origin, at most ``pool_size`` of them at a time."""

    def __init__(self, upstream: Upstream, *, source: str | None = None) -> None:
        url = URL(upstream.url)
        self._host = url.host or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        self.tls: tls_reload.LiveContext | None = None
        if url.scheme == "https":  # never plaintext to an https upstream

            def build() -> ssl.SSLContext:
                ctx = tls.upstream_context(upstream, source=source)
                if ctx is None:
                    raise UpstreamError("no TLS context for an https upstream")
                return ctx

            files = [upstream.ca, upstream.client_cert, upstream.client_key]
            self.tls = tls_reload.LiveContext(
                "upstream", build, [f for f in files if f is not None], on_swap=self._swap_tls
            )
            self._ssl = self.tls.current
        self._connect_timeout = upstream.connect_timeout
        self._read_timeout = upstream.read_timeout
        self._limit = upstream.pool_size
        self._pool_timeout = upstream.pool_timeout
        self._idle: list[Connection] = []  # a stack: the most recently used connection first
        self._all: set[Connection] = set()
        # Each waiter learns True (a slot is free: try again) or False (its time is up).
        self._waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._opening = 0
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def open_count(self) -> int:
        return len(self._all) + self._opening

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None = None,
    ) -> UpstreamResponse:
        """Send one request and return once the response head has arrived."""
        head, declared = _head(method, target, headers, body)
        replayable = method in REPLAYABLE and (body is None or isinstance(body, bytes))
        fresh = False
        while True:
            conn = await self._acquire(fresh=fresh)
            reused = conn.requests > 0
            try:
                conn.send(head, body, declared, head_only=method == "HEAD")
                await conn.wait_head()
            except BaseException as exc:
                stale = reused and conn.nothing_received and isinstance(exc, UpstreamError)
                self._discard(conn)
                if stale and replayable and not isinstance(exc, UpstreamTimeout):
                    replayable = False  # once: a second failure is the upstream's answer
                    fresh = True
                    continue
                raise
            return UpstreamResponse(self, conn)

    def release(self, conn: Connection) -> None:
        if self._closed or not conn.reusable():
            self._discard(conn)
            return
        now = asyncio.get_running_loop().time()
        conn.park(now)
        self._idle.append(conn)
        oldest = self._idle[0]
        if oldest.idle_since is not None and now - oldest.idle_since > IDLE_SECONDS:
            self._idle.pop(0)
            self._discard(oldest, graceful=True)
        self._wake_one()

    def _swap_tls(self, ctx: ssl.SSLContext) -> None:
        """New connections use ``ctx``; idle ones were verified under the old trust: closed."""
        self._ssl = ctx
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn, graceful=True)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn, graceful=True)
        for conn in list(self._all):
            self._discard(conn)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamError("the upstream pool is closed"))

    # -- the pool ---------------------------------------------------------------------------

    async def _acquire(self, *, fresh: bool = False) -> Connection:
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            now = loop.time()
            while self._idle and not fresh:
                conn = self._idle.pop()
                if conn.usable and now - (conn.idle_since or 0.0) < IDLE_SECONDS:
                    return conn
                self._discard(conn)
            if len(self._all) + self._opening < self._limit:
                return await self._connect()
            if deadline is None:  # one budget for the whole wait, however often we are woken
                deadline = now + self._pool_timeout
            waiters = self._waiters
            while waiters and waiters[0].done():  # expired ones ahead: nothing to wake there
                waiters.popleft()
            waiter: asyncio.Future[bool] = loop.create_future()
            waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                woken = await waiter
            except asyncio.CancelledError:
                if _was_handed_a_slot(waiter):
                    self._wake_one()  # the slot we were handed goes to the next in line
                else:
                    with contextlib.suppress(ValueError):  # close() or a wake took it already
                        waiters.remove(waiter)
                raise
            finally:
                timer.cancel()
            if not woken:
                # Raised here, not stored on the future: an exception kept on a queued future
                # would hold this request's frames (headers, body) until the next wake-up.
                raise UpstreamTimeout(
                    "no upstream connection became free within upstream.pool_timeout; raise "
                    "upstream.pool_size (if the upstream can take more) or upstream.pool_timeout",
                    code="upstream_pool_timeout",
                )

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        self._opening += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(self._read_timeout, self._lost),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout("the upstream did not accept a connection in time") from None
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamError(
                f"the upstream's TLS certificate could not be verified ({exc.verify_message})"
            ) from exc
        except OSError as exc:  # refused, unreachable, other TLS failures (ssl.SSLError)
            raise UpstreamError(f"the upstream is unreachable ({type(exc).__name__})") from exc
        finally:
            self._opening -= 1
            if len(self._all) + self._opening < self._limit:
                self._wake_one()
        self._all.add(conn)
        return conn

    def _discard(self, conn: Connection, *, graceful: bool = False) -> None:
        conn.close(graceful=graceful)
        if conn in self._all:
            self._all.discard(conn)
            self._wake_one()

    def _lost(self, conn: Connection) -> None:
        """A connection closed under us: an idle one leaves the pool at once."""
        if conn.idle_since is not None and conn in self._idle:
            self._idle.remove(conn)
            self._discard(conn)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return


def _expire(waiter: asyncio.Future[bool]) -> None:
    """A waiter's time is up. One already woken keeps its slot (its task runs next); one not
    woken was never handed a slot, so no wake-up is lost: it stays queued, done, and
    :meth:`UpstreamPool._wake_one` skips it (no O(n) removal under overload)."""
    if not waiter.done():
        waiter.set_result(False)


def _was_handed_a_slot(waiter: asyncio.Future[bool]) -> bool:
    return (
        waiter.done() and not waiter.cancelled() and waiter.exception() is None and waiter.result()
    )


def _head(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    body: bytes | AsyncIterator[bytes] | None,
) -> tuple[bytes, int | None]:
    """The request head, with framing set by the pool; also the declared length of a stream."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    declared: int | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in FRAMING:
            if lname == "content-length" and value.isascii() and value.isdigit():
                declared = int(value)
            continue
        lines.append(f"{name}: {value}\r\n")
    if isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}\r\n")
    elif body is not None:
        lines.append(
            f"Content-Length: {declared}\r\n"
            if declared is not None
            else "Transfer-Encoding: chunked\r\n"
        )
    elif method not in BODYLESS or declared is not None:
        lines.append("Content-Length: 0\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # Every line ends in exactly one CRLF: a CR or LF inside a value would split the message.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise UpstreamError(
            "a header or the target holds CR or LF: not sent", code="bad_request_head"
        )
    try:
        return text.encode("utf-8", "surrogateescape"), declared
    except UnicodeEncodeError:  # its args would carry the whole head, Authorization included
        raise UpstreamError(
            "the request head cannot be encoded: not sent", code="bad_request_head"
        ) from None
