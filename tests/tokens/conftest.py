"""Fixtures for vault tests: ``make_vault`` builds a Vault on each store backend (sqlite and a
real PostgreSQL) with a real local keyring; two calls share the store (two sidecars)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecrypt import config
from sidecrypt.events import AuditEvent
from sidecrypt.keyring import create_key
from sidecrypt.keys import DataKeyService
from sidecrypt.plugin_manager import build_providers, make_plugin_manager
from sidecrypt.tokens.table import vault_table
from sidecrypt.tokens.vault import Vault

MakeVault = Callable[..., Awaitable[Vault]]


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    path = tmp_path / "keyring.json"
    create_key(path, "app")
    return path


@pytest.fixture
async def make_vault(
    make_store: Any,
    keyring: Path,
    tmp_path: Path,
) -> AsyncIterator[MakeVault]:
    providers_started: list[Any] = []

    async def make(
        *, audit: list[AuditEvent] | None = None, cache_entries: int = 1000, **kw: Any
    ) -> Vault:
        store = await make_store()
        raw = {
            "upstream": {"url": "http://127.0.0.1:9"},
            "keys": {"app": {"provider": "local", "keyring": str(keyring), "key": "app"}},
        }
        settings = config.parse(raw, base_dir=tmp_path)
        providers = build_providers(settings, make_plugin_manager(entry_points=False))
        for provider in providers.values():
            await provider.start()
            providers_started.append(provider)
        sink = audit.append if audit is not None else (lambda e: None)
        keys = DataKeyService(providers, audit=sink)
        return Vault(vault_table(store), keys, cache_entries=cache_entries, audit=sink, **kw)

    yield make
    for provider in providers_started:
        await provider.close()
