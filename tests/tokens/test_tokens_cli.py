"""``sidecrypt tokens init|stats|rewrap|forget`` as users run them (a subprocess on a config
with a sqlite vault): rewrap after a key rotation keeps every token resolving and moves the
rows to the new version; forget makes one tenant's tokens unresolvable and leaves the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from sidecrypt import config
from sidecrypt.keyring import create_key, rotate_key
from sidecrypt.keys import DataKeyService
from sidecrypt.plugin_manager import build_providers, build_stores, make_plugin_manager
from sidecrypt.tokens.cache import MISSING
from sidecrypt.tokens.formats import build_format
from sidecrypt.tokens.table import vault_table
from sidecrypt.tokens.vault import Vault

SIDECRYPT = [sys.executable, "-m", "sidecrypt.cli"]
SSN = build_format("ssn", {}, consistent=True)
ACME = (("tenant", "acme"),)
BETA = (("tenant", "beta"),)


def _cli(*args: str) -> Any:
    done = subprocess.run([*SIDECRYPT, "tokens", *args], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def _config(tmp_path: Path) -> Path:
    keyring = tmp_path / "keyring.json"
    create_key(keyring, "app")
    raw = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "keys": {"app": {"provider": "local", "keyring": str(keyring), "key": "app"}},
        "stores": {"vault": {"type": "sqlite", "path": "vault.db"}},
        "routes": [
            {
                "match": {"path": "/users/**"},
                "key": "app",
                "context": {"tenant": "header:X-Tenant"},
                "request": {"tokenize": [{"path": "$.ssn", "format": "ssn", "consistent": True}]},
            }
        ],
    }
    path = tmp_path / "sidecrypt.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def _with_vault(path: Path, work: Any) -> Any:
    settings = config.load(path)
    pm = make_plugin_manager(entry_points=False)
    store = build_stores(settings, pm)["vault"]
    providers = build_providers(settings, pm)
    await store.start()
    for p in providers.values():
        await p.start()
    try:
        return await work(Vault(vault_table(store), DataKeyService(providers), cache_entries=0))
    finally:
        for p in providers.values():
            await p.close()
        await store.close()


async def test_init_stats_rewrap_forget(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    out, _ = _cli("init", "--config", str(cfg))
    assert out == {"app": {"root_version": 1}}
    values = [f"{i:03d}-12-3456" for i in range(100, 130)]

    async def write(vault: Vault) -> tuple[list[Any], list[Any]]:
        items = [(SSN, True, v) for v in values]
        return await vault.tokenize("app", ACME, items), await vault.tokenize("app", BETA, items)

    acme, beta = await _with_vault(cfg, write)
    stats, _ = _cli("stats", "--config", str(cfg))
    assert stats["health"] == {"ok": True} and stats["entries"] == {"app": {"1": 60}}

    rotate_key(tmp_path / "keyring.json", "app")
    out, progress = _cli("rewrap", "--config", str(cfg))
    assert out == [{"key": "app", "rows": 60, "rewrapped": 60, "versions_before": {"1": 60}}]
    assert b"rewrap: 60 rows, 60 re-sealed" in progress
    stats, _ = _cli("stats", "--config", str(cfg))
    assert stats["entries"] == {"app": {"2": 60}}

    out, _ = _cli("forget", "--config", str(cfg), "--context", "tenant=acme")
    assert out == {"context": {"tenant": "acme"}, "deleted": 30}

    async def read(vault: Vault) -> tuple[list[Any], list[Any], list[Any]]:
        again = await vault.tokenize("app", BETA, [(SSN, True, v) for v in values])
        return (
            await vault.detokenize("app", ACME, [(SSN, t) for t in acme]),
            await vault.detokenize("app", BETA, [(SSN, t) for t in beta]),
            again,
        )

    gone, kept, again = await _with_vault(cfg, read)
    assert gone == [MISSING] * 30
    assert kept == values and again == beta  # same tokens after rotation and rewrap
