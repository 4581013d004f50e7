"""``server.send_timeout``: a client that stops reading its answer loses the connection.

Without it a client that never reads (a slow-read attack, or a peer gone without a FIN) holds
its connection, its handler and, for a streamed answer, an upstream connection for ever: a few
hundred such clients take the whole upstream pool. The transport tells the protocol when its
buffer of unsent data passes the high-water mark (the kernel's send buffer is full, so the
client is not reading) and when it has drained again; a pause longer than ``send_timeout``
aborts the connection, which cancels the handler and releases what it held.

As nginx's ``send_timeout``, this bounds each stall, not the whole answer: a slow client that
keeps taking data in gets all of it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)


class SendTimeout(BaseProtocol):
    """Flow-control callbacks that arm and disarm the send timer (a mixin for both engines).

    The concrete class sets ``_send_timeout`` and ``_send_timer = None`` in its ``__init__``.
    """

    _send_timeout: float
    _send_timer: asyncio.TimerHandle | None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(self._send_timeout, self._send_expired)

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_send_timer()
        super().connection_lost(exc)

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_expired(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is not None and self._paused:
            log.info(
                "a client left its answer unread past server.send_timeout: connection closed",
                extra={"send_timeout": self._send_timeout},
            )
            transport.abort()  # close() would wait for a flush that never comes


class BoundedRequestHandler(SendTimeout, RequestHandler):
    """aiohttp's connection protocol with the send timer."""

    def __init__(self, manager: BoundedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._send_timeout = manager.send_timeout
        self._send_timer = None


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
