"""Built-in access log: one structured line per proxied request, on either engine.

Off by default (``server.access_log: true``). A request observer, not aiohttp's access logger:
it works on the lean engine too, and it writes what an operator needs and nothing a client
sent as data: the route's label (a config string, never the path or query, which may carry
values), the status, duration, body sizes, request id and caller identity.
"""

from __future__ import annotations

import logging

from aiohttp import web

from .. import appkeys, hookimpl
from ..config import Settings
from ..proxy.incoming import RequestView

log = logging.getLogger("sidecrypt.access")
UNMATCHED = "unmatched"


def observe(request: RequestView, status: int, seconds: float) -> None:
    principal = request.get(appkeys.PRINCIPAL)
    route = request.get(appkeys.ROUTE)
    sent = request.get(appkeys.RESPONSE_BYTES)
    request_id = request.get(appkeys.REQUEST_ID)
    log.info(
        "request",
        extra={
            "method": request.method,
            "route": route or UNMATCHED,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "request_bytes": request.content_length,
            "response_bytes": sent,
            "request_id": request_id,
            "principal": principal.id if principal is not None else None,
        },
    )


@hookimpl
def sidecrypt_app(app: web.Application, settings: Settings) -> None:
    if settings.server.access_log:
        app.setdefault(appkeys.REQUEST_OBSERVERS, []).append(observe)
