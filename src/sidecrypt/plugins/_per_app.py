"""Per-app plugin objects: the built-ins keep per-app state on an object registered by name."""

from __future__ import annotations

from typing import TypeVar

import pluggy

T = TypeVar("T")


def install(pm: pluggy.PluginManager, name: str, plugin: T) -> T:
    """Register ``plugin`` on ``pm`` as ``name``, replacing what an earlier install put there.

    Installing twice on one manager (tests, a re-run ``sidecrypt_app``) must leave one object
    answering the hooks, never two.
    """
    old = pm.get_plugin(name)
    if old is not None:
        pm.unregister(old)
    pm.register(plugin, name=name)
    return plugin
