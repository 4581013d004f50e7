"""A scripted raw HTTP/1.1 upstream on a real 127.0.0.1 socket, for the upstream pool tests.

Each test scripts what the server does on every accepted connection (read a request, answer with
exact, even malformed, bytes, stall, close...), and the server records the connections it accepted
and every byte it received, so tests can check reuse and framing from the server's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

READ_PIECE = 64 * 1024


@dataclass
class RawRequest:
    method: str
    target: str
    version: str
    headers: list[tuple[bytes, bytes]]
    head: bytes  # request line + header lines + blank line, exactly as received
    body: bytes  # decoded body (chunk framing removed)
    raw_body: bytes  # body bytes as they were on the wire
    chunked: bool

    def header(self, name: str) -> bytes | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == key:
                return v
        return None


class RawConn:
    """One accepted connection: the test's script reads and writes through it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        index: int,
        read_delay: float | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.index = index
        self.read_delay = read_delay
        self.received = bytearray()
        self.body_received = 0  # body bytes consumed so far (grows while a body streams in)
        self.requests: list[RawRequest] = []
        self.eof = False  # the peer closed its side (seen by a read)

    async def read_request(self) -> RawRequest | None:
        """The next request; None on a clean EOF before its first byte."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            self.received += exc.partial
            self.eof = True
            if exc.partial:
                raise
            return None
        except ConnectionError:
            self.eof = True
            return None
        self.received += head
        lines = head[:-4].split(b"\r\n")
        method, target, version = lines[0].decode("latin-1").split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
        req = RawRequest(method, target, version, headers, head, b"", b"", False)
        te = req.header("transfer-encoding")
        cl = req.header("content-length")
        if te is not None and te.lower() == b"chunked":
            req.chunked = True
            body, raw = bytearray(), bytearray()
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                self.received += size_line
                raw += size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, then the blank line
                        line = await self.reader.readuntil(b"\r\n")
                        self.received += line
                        raw += line
                        if line == b"\r\n":
                            break
                    break
                data = await self._read_exact(size)
                body += data
                raw += data
                crlf = await self.reader.readexactly(2)
                self.received += crlf
                raw += crlf
                assert crlf == b"\r\n", "chunk not followed by CRLF"
            req.body, req.raw_body = bytes(body), bytes(raw)
        elif cl is not None:
            req.body = req.raw_body = await self._read_exact(int(cl))
        self.requests.append(req)
        return req

    async def _read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            piece = await self.reader.read(min(READ_PIECE, n - len(out)))
            if not piece:
                self.eof = True
                raise asyncio.IncompleteReadError(bytes(out), n)
            out += piece
            self.received += piece
            self.body_received += len(piece)
            if self.read_delay is not None:
                await asyncio.sleep(self.read_delay)
        return bytes(out)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_until_eof(self) -> bytes:
        """Everything else the peer sends, until it closes the connection."""
        data = await self.reader.read()
        self.received += data
        self.eof = True
        return data

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        transport = self.writer.transport
        transport.abort()


Script = Callable[[RawConn], Coroutine[Any, Any, None]]


class RawUpstream:
    """A TCP (or TLS) server that runs ``script`` on every accepted connection."""

    def __init__(
        self,
        script: Script,
        *,
        ssl_context: ssl.SSLContext | None = None,
        rcvbuf: int | None = None,
        read_delay: float | None = None,
    ) -> None:
        self.script = script
        self.ssl_context = ssl_context
        self.rcvbuf = rcvbuf
        self.read_delay = read_delay
        self.connections: list[RawConn] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def accepted(self) -> int:
        return len(self.connections)

    def url(self, host: str = "127.0.0.1") -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> RawUpstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf is not None:  # accepted sockets inherit it: bounds the kernel's buffering
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(
            self._handle, sock=sock, ssl=self.ssl_context, limit=READ_PIECE
        )
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn(reader, writer, len(self.connections), self.read_delay)
        self.connections.append(conn)
        # The script runs in its own task, so close() can cancel it without cancelling the
        # handler task asyncio's stream machinery watches.
        task: asyncio.Task[None] = asyncio.create_task(self.script(conn))
        self._tasks.add(task)
        try:
            await task
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            conn.eof = True
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # surfaced by the test through .errors
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for _ in range(100):  # let the handlers see their scripts end and close the sockets
            if not self._tasks:
                break
            await asyncio.sleep(0.001)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> RawUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait (polling) until ``predicate()`` holds; fail the test with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.002)


def response(
    status: int = 200,
    body: bytes = b"",
    *,
    headers: tuple[tuple[str, str], ...] = (),
    reason: str = "OK",
    length: bool = True,
) -> bytes:
    """A well-formed HTTP/1.1 response with Content-Length (unless ``length`` is False)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def serve(answer: Callable[[RawRequest], bytes] | bytes) -> Script:
    """A keep-alive server: read a request, send the answer, repeat until the peer closes."""

    async def script(conn: RawConn) -> None:
        while True:
            req = await conn.read_request()
            if req is None:
                return
            await conn.send(answer(req) if callable(answer) else answer)

    return script
