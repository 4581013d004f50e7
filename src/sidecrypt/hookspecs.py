"""Every hook sidecrypt calls, typed and documented (docs/plugins.md mirrors this file).

pluggy cannot await, so hooks are plain functions. Where I/O is involved, a hook returns an
object whose methods are async (key providers) or hands work to a background task (audit sinks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from . import PROJECT

if TYPE_CHECKING:
    from aiohttp import web

    from .config import Settings
    from .events import AuditEvent
    from .identity import Principal
    from .keys import KeyProvider

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def sidecrypt_key_provider_types() -> list[type[KeyProvider]]:  # type: ignore[empty-body]
    """Key provider classes this plugin offers.

    A config block ``keys.<name>: {provider: TYPE, ...}`` picks the class whose ``type_name`` is
    ``TYPE``. Two plugins offering the same type name is a start-up error.
    """


@hookspec
def sidecrypt_audit(event: AuditEvent) -> None:
    """Record one audit event. Must not block: queue it and write in the background.

    Called for every key use and decision. Events carry paths and key names, never values.
    """


@hookspec(firstresult=True)
def sidecrypt_identify(request: web.Request) -> Principal | None:
    """Establish who is calling (mTLS certificate, JWT, trusted header), or None.

    The first non-None answer wins. ``request["sidecrypt.peer_cert"]`` holds the verified client
    certificate when mTLS is on.
    """


@hookspec(firstresult=True)
def sidecrypt_authorize(
    principal: Principal | None, action: str, route: str, field: str
) -> str | None:
    """Decide what a caller gets for one field: ``reveal``, ``mask``, ``ciphertext``, ``drop``
    or ``deny``. None means "no opinion"; when nobody has one the route's default applies.

    ``action`` is ``decrypt`` for now; ``field`` is the selector as configured.
    """


@hookspec
def sidecrypt_app(app: web.Application, settings: Settings) -> None:
    """Extend the proxy app: add startup/cleanup contexts, middlewares, or admin routes.

    Runs once per app, before it starts. ``app["sidecrypt.admin"]`` is the admin app (healthz,
    readyz, metrics) when this is the proxy app.
    """


@hookspec
def sidecrypt_readiness(app: web.Application) -> list[tuple[str, Any]]:  # type: ignore[empty-body]
    """Named readiness checks: ``(name, async_callable)`` pairs; a check raises when not ready.

    ``/readyz`` runs them all and reports each by name.
    """
