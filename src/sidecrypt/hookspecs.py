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

    from .audit_chain import AuditSink
    from .config import Settings
    from .events import AuditEvent
    from .identity import Principal
    from .keys import KeyProvider
    from .proxy.incoming import RequestView
    from .stores.base import Store

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def sidecrypt_key_provider_types() -> list[type[KeyProvider]]:  # type: ignore[empty-body]
    """Key provider classes this plugin offers.

    A config block ``keys.<name>: {provider: TYPE, ...}`` picks the class whose ``type_name`` is
    ``TYPE``. Two plugins offering the same type name is a start-up error.
    """


@hookspec
def sidecrypt_store_types() -> list[type[Store]]:  # type: ignore[empty-body]
    """Store classes this plugin offers (``sidecrypt.stores.base.Store``).

    A config block ``stores.<name>: {type: TYPE, ...}`` picks the class whose ``type_name`` is
    ``TYPE``; features (branch keys, the token vault) reach their tables on it through
    ``store.table(feature)``. Two plugins offering the same type name is a start-up error.
    Built-ins: ``sqlite`` and ``postgresql`` (trylast, so a third party may override them).
    """


@hookspec
def sidecrypt_audit(event: AuditEvent) -> None:
    """Record one audit event. Must not block: queue it and write in the background.

    Called for every key use and decision. Events carry paths and key names, never values.
    """


@hookspec(firstresult=True)
def sidecrypt_identify(request: RequestView) -> Principal | None:
    """Establish who is calling (mTLS certificate, JWT, trusted header), or None.

    The first non-None answer wins. ``request["sidecrypt.peer_cert"]`` holds the verified client
    certificate when mTLS is on.
    """


@hookspec(firstresult=True)
def sidecrypt_authorize(
    principal: Principal | None,
    action: str,
    route: str,
    field: str,
    key: str | None,
    purpose: str | None,
) -> str | None:
    """Decide what a caller gets for one field: ``reveal``, ``mask``, ``ciphertext``, ``drop``
    or ``deny``. None means "no opinion"; when nobody has one the field stays ``ciphertext``.

    ``action`` is ``decrypt`` for now; ``route`` the route label; ``field`` the field's label
    (``$.a[*].b``) or selector; ``key`` the route's key name; ``purpose`` the declared purpose
    (``X-Purpose``) or None. The proxy calls it through ``sidecrypt.decisions.Decider``.
    """


@hookspec(firstresult=True)
def sidecrypt_mask(route: str, key: str | None, field: str, value: Any) -> str | None:
    """The masked form of one decrypted value whose outcome is ``mask``, or None.

    ``value`` is the decrypted JSON value (plaintext: never log it). The first non-None answer
    wins; when nobody answers, strings of 8+ characters keep their last 4 behind ``****`` and
    anything else becomes ``****``. The built-in policy answers (trylast) with its ``mask``
    settings.
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


@hookspec
def sidecrypt_audit_sinks(settings: Settings) -> list[AuditSink]:  # type: ignore[empty-body]
    """Where audit records go, besides (or instead of) the built-in ``audit.file`` sink.

    Each sink gets every sealed record (``audit_chain.Record``: seq, HMAC chain, JSON line) in
    order, from a background writer: ``async write(records)`` / ``async close()``; a raising
    ``write`` is retried with the same records and counts as a failing sink for
    ``audit.on_failure``. Any sink requires ``audit.hmac_key``.
    """


@hookspec
def sidecrypt_check_config(settings: Settings) -> list[str]:  # type: ignore[empty-body]
    """Validate this plugin's part of the config; return notes for ``check-config`` to print.

    Raise ``ConfigError`` (with file and dotted path) for a bad setting. Runs at start-up too,
    so a broken plugin config stops the proxy before it listens.
    """
