"""``server.send_timeout``: a client that stops reading its answer loses the connection.

Without it a client that never reads (a slow-read attack, or a peer gone without a FIN) holds
its connection, its handler and, for a streamed answer, an upstream connection for ever: a few
hundred such clients take the whole upstream pool. Even a small answer left unread holds the
connection, since closing it waits for a flush that never comes.

The clock starts when the transport pauses the protocol (its buffer of unsent answer data passed
the high-water mark: the client is not keeping up) and when the proxy closes a connection with
data still unsent. Every ``send_timeout`` seconds the buffer is looked at: if it has not shrunk,
the client took nothing in for that long and the connection is aborted, which cancels the
handler and releases what it held. As nginx's ``send_timeout``, this bounds each stall, not the
whole answer: a slow client that keeps taking data in gets all of it. Over TLS, data reaches the
socket in steps of the TLS layer's own buffer (up to 64 KiB), so there a client must take in
about that much per ``send_timeout`` (about 1 KiB/s with the default 60 s).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)


class SendTimeout(BaseProtocol):
    """Flow-control callbacks that watch a client that does not read (a mixin for both engines).

    The concrete class calls :meth:`_init_send_timeout` in its ``__init__`` and
    :meth:`_watch_send` after it closes the transport itself.
    """

    _send_timeout: float
    _send_timer: asyncio.TimerHandle | None
    _send_transport: asyncio.Transport | None  # aiohttp's engine drops .transport on close
    _send_pending: int

    def _init_send_timeout(self, timeout: float) -> None:
        self._send_timeout = timeout
        self._send_timer = None
        self._send_transport = None
        self._send_pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._send_transport = cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_send()

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_send_timer()
        self._send_transport = None
        super().connection_lost(exc)

    def _watch_send(self) -> None:
        """Start the clock if answer data waits for the client (and it is not running)."""
        transport = self._send_transport
        if self._send_timer is None and transport is not None:
            pending = transport.get_write_buffer_size()
            if pending:
                self._send_pending = pending
                self._send_timer = self._loop.call_later(self._send_timeout, self._send_expired)

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_expired(self) -> None:
        self._send_timer = None
        transport = self._send_transport
        if transport is None:
            return
        pending = transport.get_write_buffer_size()
        if not pending:  # all of it went out
            return
        if pending < self._send_pending:  # the client took some in: a slow reader, not a stall
            self._watch_send()
            return
        log.info(
            "a client left its answer unread past server.send_timeout: connection closed",
            extra={"send_timeout": self._send_timeout},
        )
        transport.abort()  # close() would wait for a flush that never comes


class BoundedRequestHandler(SendTimeout, RequestHandler):
    """aiohttp's connection protocol with the send timer."""

    def __init__(self, manager: BoundedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._init_send_timeout(manager.send_timeout)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # aiohttp closes the transport where the connection's task ends (or in force_close):
        # what it leaves unsent is watched from then on.
        task = self._task_handler
        if task is not None:
            task.add_done_callback(lambda _: self._watch_send())

    def force_close(self) -> None:
        super().force_close()
        self._watch_send()


class BoundedServer(web.Server):
    """aiohttp's ``web.Server`` making :class:`BoundedRequestHandler` connections."""

    def __init__(self, handler: Any, *, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.send_timeout = send_timeout

    def __call__(self) -> RequestHandler:
        return BoundedRequestHandler(self, loop=self._loop, **self._kwargs)


def install(runner: web.AppRunner, send_timeout: float) -> None:
    """Serve ``runner``'s connections (aiohttp's engine) with the send timer: the same server,
    handler and settings, re-made as a :class:`BoundedServer`. After ``runner.setup()``, before
    any site starts."""
    base = runner.server
    assert base is not None, "call after runner.setup()"
    server = BoundedServer(
        base.request_handler,
        send_timeout=send_timeout,
        request_factory=base.request_factory,
        handler_cancellation=base.handler_cancellation,
        loop=base._loop,
        **base._kwargs,
    )
    runner._server = server
