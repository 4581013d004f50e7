"""Vault administration, for ``sidecrypt tokens init|rewrap|stats|forget``: no HTTP.

``rewrap`` re-seals every row under its key's newest version (tokens never change, so
nothing in the app's database needs rewriting); ``forget`` deletes a context's rows, which
makes that tenant's tokens unresolvable (erasure without touching the app). Callers build the
store, providers and data key service; this module only walks the vault.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .. import keys as keymod
from ..envelope import parse
from ..events import AuditEvent
from .table import cursor
from .vault import Vault, context_text, parse_context

Progress = Callable[[int, int], None]  # (rows done, rows rewrapped)


async def init(vault: Vault, key_names: Sequence[str]) -> dict[str, Any]:
    """Create (or load) the blind index root of each key: one provider call each."""
    out: dict[str, Any] = {}
    for name in key_names:
        tk = await vault.token_keys(name)
        out[name] = {"root_version": tk.version}
    return out


async def rewrap(
    vault: Vault,
    name: str,
    *,
    batch: int = 500,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Re-seal every row of key ``name`` not sealed under its newest version."""
    done = moved = 0
    before: dict[int, int] = {}
    after = None
    while page := await vault.table.entries(name, after, batch):
        for row in page:
            done += 1
            env = parse(row.sealed)
            before[env.key_version] = before.get(env.key_version, 0) + 1
            context = parse_context(row.context)
            newest = await vault.keys.for_encrypt(name, context, 0)
            if env.key_version == newest.key_version and env.key_name == name:
                continue
            value = await vault.open(name, context, row.format, row.token, row.sealed)
            sealed, kek = await vault.seal_value(name, context, row.format, row.token, value)
            if await vault.table.update_sealed(
                replace(row, sealed=sealed, kek_version=kek), row.sealed
            ):
                moved += 1
        after = cursor(page[-1])
        if progress is not None:
            progress(done, moved)
    vault.audit(AuditEvent("rewrap", key=name, count=moved, step="token_vault"))
    return {"key": name, "rows": done, "rewrapped": moved, "versions_before": before}


async def stats(vault: Vault, store: Any) -> dict[str, Any]:
    """Entries per key and key version, and the store's health."""
    health: dict[str, Any] = {"ok": True}
    try:
        await store.check()
    except Exception as exc:  # reported, not raised: stats is how an operator looks
        health = {"ok": False, "error": getattr(exc, "message", type(exc).__name__)}
    rows = await vault.table.stats()
    keys: dict[str, dict[str, int]] = {}
    for key, version, count in rows:
        keys.setdefault(key, {})[str(version)] = count
    return {"store": store.describe(), "health": health, "entries": keys}


async def forget(vault: Vault, context: Mapping[str, str]) -> dict[str, Any]:
    """Delete every vault row of one encryption context (all keys, all formats)."""
    canonical = keymod.canonical_context(context)
    deleted = await vault.table.forget(context_text(canonical))
    vault.cache.clear()
    vault.audit(
        AuditEvent("token_forget", context=dict(canonical), count=deleted, step="token_vault")
    )
    return {"context": dict(canonical), "deleted": deleted}
