"""``sidecrypt keys rotate|forget --config``: administer the branch keys of configured keys.

Rotation adds a version through the key's provider (one GenerateDataKey for KMS); running
sidecars pick it up within their ``hierarchy.refresh``. Forgetting deletes every version of a
branch (``tenant=acme``): each field ever encrypted under it becomes unreadable wherever the
app stored it (crypto-shredding). Both are recorded in the config's audit trail.
"""

from __future__ import annotations

import getpass
from typing import Any

from .config import Settings
from .crypto.hierarchy import branch_keys
from .crypto.hierarchy.provider import HierarchicalProvider
from .errors import ConfigError
from .events import AuditEvent
from .plugin_manager import build_providers, build_stores, make_plugin_manager


def parse_branch(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ConfigError("--branch must be NAME=VALUE, e.g. tenant=acme")
    return name, value


def _hierarchy_keys(settings: Settings, key: str | None) -> dict[str, dict[str, Any]]:
    found = {
        name: block["hierarchy"]
        for name, block in settings.keys.items()
        if isinstance(block, dict) and isinstance(block.get("hierarchy"), dict)
    }
    if key is not None:
        if key not in found:
            raise ConfigError(f"key {key!r} has no hierarchy", file=settings.source, path="keys")
        return {key: found[key]}
    return found


async def rotate(settings: Settings, key: str, branch: str | None) -> list[dict[str, Any]]:
    """A new active version for the key's branch (or every branch it has)."""
    _hierarchy_keys(settings, key)
    provider = build_providers(settings, make_plugin_manager())[key]
    assert isinstance(provider, HierarchicalProvider)
    await provider.start()
    try:
        if branch is not None:
            per, value = parse_branch(branch)
            if provider.options.per != per:
                raise ConfigError(
                    f"key {key!r} has no branch per {per!r}", file=settings.source, path="keys"
                )
            branches = [f"{per}={value}"]
        elif provider.options.per is None:
            branches = [""]
        else:
            branches = sorted({r.branch for r in await provider.table.versions(key)})
        out = []
        for one in branches:
            row = await provider.rotate(one)
            out.append({"name": key, "branch": one or None, "version": row.version})
        return out
    finally:
        await provider.close()


async def forget(settings: Settings, branch: str, key: str | None) -> list[dict[str, Any]]:
    """Delete every version of the branch of every key with ``per`` equal to its name."""
    per, value = parse_branch(branch)
    keys = {name: h for name, h in _hierarchy_keys(settings, key).items() if h.get("per") == per}
    if not keys:
        raise ConfigError(f"no key has a branch key per {per!r}", file=settings.source, path="keys")
    stores = build_stores(settings, make_plugin_manager())
    out = []
    try:
        for name, hierarchy in keys.items():
            store = stores[str(hierarchy.get("store", "default"))]
            await store.start()
            deleted = await branch_keys(store).forget(name, f"{per}={value}")
            out.append({"name": name, "branch": f"{per}={value}", "versions_deleted": deleted})
    finally:
        for store in stores.values():
            await store.close()
    return out


def events(action: str, done: list[dict[str, Any]]) -> list[AuditEvent]:
    who = f"os:{getpass.getuser()}"
    out = []
    for item in done:
        branch = item.get("branch")
        context = dict([parse_branch(branch)]) if branch else None
        out.append(
            AuditEvent(
                action,
                key=str(item["name"]),
                key_version=item.get("version"),
                context=context,
                count=int(item.get("versions_deleted", 0)),
                principal=who,
            )
        )
    return out
