"""Typed keys for what the proxy stores on aiohttp apps and requests.

Plugins reach per-app state through these (never through module globals): the plugin manager,
the settings, the data key service and the admin app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from .proxy.incoming import RequestView

if TYPE_CHECKING:
    import pluggy

    from .config import Settings
    from .identity import PeerCertificate, Principal
    from .keys import DataKeyService
    from .proxy.tls_reload import Reloads
    from .proxy.workers import Worker
    from .stores.base import Store
    from .tokens.vault import Vault

PLUGIN_MANAGER: web.AppKey[pluggy.PluginManager] = web.AppKey("sidecrypt.pm")
SETTINGS: web.AppKey[Settings] = web.AppKey("sidecrypt.settings")
KEYS: web.AppKey[DataKeyService] = web.AppKey("sidecrypt.keys")
STORES: web.AppKey[dict[str, Store]] = web.AppKey("sidecrypt.stores")
VAULT: web.AppKey[Vault] = web.AppKey("sidecrypt.vault")
"""The token vault, when a route tokenizes (metrics read its cache and store figures)."""
"""Every configured store by name, started before the key providers."""
ADMIN: web.AppKey[web.Application] = web.AppKey("sidecrypt.admin")
PROXY: web.AppKey[web.Application] = web.AppKey("sidecrypt.proxy")
AUDIT_GATE: web.AppKey[Callable[[], bool]] = web.AppKey("sidecrypt.audit_gate")
"""Set by the audit plugin: a fast sync check; False means refuse key use with 503."""
WORKER: web.AppKey[Worker] = web.AppKey("sidecrypt.worker")
TLS_RELOADS: web.AppKey[Reloads] = web.AppKey("sidecrypt.tls_reloads")
"""The proxy's replaceable TLS contexts (listener, upstream) and their reload counts."""
"""This process's place among ``server.workers`` (absent with one worker)."""

RequestObserver = Callable[[RequestView, int, float], None]
"""Called after every proxied request with its status and seconds (metrics); must not block.

An observer list instead of an aiohttp middleware: a middleware adds two coroutine layers per
request, which cost ~10% of pass-through throughput in the bench (bench/PROFILE.md).
"""
REQUEST_OBSERVERS: web.AppKey[list[RequestObserver]] = web.AppKey("sidecrypt.request_observers")
PROXY_GAUGES: web.AppKey[Callable[[], dict[str, int]]] = web.AppKey("sidecrypt.proxy_gauges")
"""The proxy's live figures, read at scrape time: requests in flight, upstream connections."""

PEER_CERT: web.RequestKey[PeerCertificate | None] = web.RequestKey("sidecrypt.peer_cert")
PRINCIPAL: web.RequestKey[Principal | None] = web.RequestKey("sidecrypt.principal")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("sidecrypt.request_id")
ROUTE: web.RequestKey[str] = web.RequestKey("sidecrypt.route")
UPSTREAM_SECONDS: web.RequestKey[float] = web.RequestKey("sidecrypt.upstream_seconds")
RESPONSE_BYTES: web.RequestKey[int | None] = web.RequestKey("sidecrypt.response_bytes")
"""The answer's body size, set before the observers run (None: not known, e.g. HEAD)."""
