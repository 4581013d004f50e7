"""A recording TCP relay: what actually crosses a hop, byte for byte.

The demo puts one between the client and sidecrypt (TLS records) and one before a sink that
stands for "the same request over plain HTTP", so the page shows real captured bytes rather
than a drawing. Demo use only: it keeps a bounded tail of what it relayed.
"""

from __future__ import annotations

import asyncio
import contextlib

KEEP = 64 * 1024  # bytes of each direction kept


class Tap:
    """Relays 127.0.0.1:port to a target and records both directions (bounded)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.sent = bytearray()  # client -> target
        self.received = bytearray()  # target -> client
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def clear(self) -> None:
        self.sent.clear()
        self.received.clear()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                _pump(reader, up_writer, self.sent), _pump(up_reader, writer, self.received)
            )
        except asyncio.CancelledError:
            pass  # close(): asyncio's stream server would log a cancelled handler as an error
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: bytearray) -> None:
    try:
        while chunk := await src.read(65536):
            log.extend(chunk)
            if len(log) > KEEP:
                del log[: len(log) - KEEP]
            dst.write(chunk)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if dst.can_write_eof():
                dst.write_eof()
