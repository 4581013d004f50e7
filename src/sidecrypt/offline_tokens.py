"""``sidecrypt tokens ...``: the vault's store and key providers opened from a config.

``init`` creates the vault's schema (``store.migrate``) and each tokenizing key's root;
``rewrap`` re-seals rows under each key's newest version with a progress line on stderr;
``stats`` counts rows per key version and checks the store; ``forget`` deletes a context.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .config import Settings
from .errors import ConfigError
from .events import AuditEvent
from .keys import DataKeyService
from .plugin_manager import build_providers, build_stores, make_plugin_manager
from .tokens import admin
from .tokens.table import vault_table
from .tokens.vault import Vault

log = logging.getLogger("sidecrypt.tokens")


def _audit(event: AuditEvent) -> None:
    log.info("vault %s", event.action, extra={"event": event._asdict()})


def token_keys(settings: Settings) -> list[str]:
    """The keys of routes that tokenize, in config order."""
    names: list[str] = []
    for route in settings.routes:
        if route.has_tokens and route.key is not None and route.key not in names:
            names.append(route.key)
    return names


async def with_vault(
    settings: Settings, work: Callable[[Vault, Any], Awaitable[Any]], *, migrate: bool = False
) -> Any:
    name = settings.vault_store
    if name is None:
        raise ConfigError("no route tokenizes: there is no vault", file=settings.source)
    pm = make_plugin_manager()
    store = build_stores(settings, pm)[name]
    providers = build_providers(settings, pm)
    started = []
    try:
        if migrate:
            await store.migrate()
        await store.start()
        for provider in providers.values():
            await provider.start()
            started.append(provider)
        keys = DataKeyService(providers, audit=_audit)
        vault = Vault(vault_table(store), keys, cache_entries=0, audit=_audit)
        return await work(vault, store)
    finally:
        for provider in started:
            await provider.close()
        await store.close()


async def run(settings: Settings, verb: str, *, context: Mapping[str, str] | None = None) -> Any:
    keys = token_keys(settings)
    if verb == "init":
        return await with_vault(settings, lambda v, s: admin.init(v, keys), migrate=True)
    if verb == "stats":
        return await with_vault(settings, admin.stats)
    if verb == "forget":
        if not context:
            raise ConfigError("forget needs --context NAME=VALUE (one tenant's entries)")
        return await with_vault(settings, lambda v, s: admin.forget(v, context))
    if verb == "rewrap":

        def progress(done: int, moved: int) -> None:
            print(f"\rrewrap: {done} rows, {moved} re-sealed", end="", file=sys.stderr)

        async def all_keys(vault: Vault, store: Any) -> Any:
            out = [await admin.rewrap(vault, name, progress=progress) for name in keys]
            print(file=sys.stderr)
            return out

        return await with_vault(settings, all_keys)
    raise ConfigError(f"unknown tokens verb {verb!r}")
