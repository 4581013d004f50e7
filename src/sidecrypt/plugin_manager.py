"""Build the plugin manager: specs, built-ins, third-party entry points, and sanity checks."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Mapping

import pluggy

from . import PROJECT, hookspecs
from .config import Settings, validate_provider_options, validate_store_options
from .crypto.hierarchy.options import HierarchyOptions
from .errors import ConfigError, PluginError
from .keys import KeyProvider
from .stores.base import Store

log = logging.getLogger(__name__)

BUILTIN_PLUGINS: tuple[str, ...] = (
    "sidecrypt.plugins.local_keys",
    "sidecrypt.plugins.aws_kms",
    "sidecrypt.plugins.audit",
    "sidecrypt.plugins.identity",
    "sidecrypt.plugins.policy",
    "sidecrypt.plugins.metrics",
    "sidecrypt.plugins.jwks",
    "sidecrypt.plugins.stores",
)


def make_plugin_manager(
    extra: Iterable[object] = (), *, entry_points: bool = True, builtins: bool = True
) -> pluggy.PluginManager:
    """A fresh manager per app (never a global), so tests and apps never share state."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    if builtins:
        for name in BUILTIN_PLUGINS:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name != name:  # the module exists but needs an optional dependency
                    log.debug("built-in plugin %s unavailable: %s", name, exc)
                continue
            pm.register(module, name=name)
    if entry_points:
        pm.load_setuptools_entrypoints(PROJECT)
    for plugin in extra:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin validation failed: {exc}") from exc
    return pm


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, str]]:
    """Loaded plugins and their distributions' versions, for the start-up log."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(id(plugin))
        version = dist.version if dist is not None else "built-in"
        out.append({"name": name or repr(plugin), "version": str(version)})
    return out


def provider_types(pm: pluggy.PluginManager) -> dict[str, type[KeyProvider]]:
    """Key provider classes by ``type_name``; a name offered twice is an error."""
    found: dict[str, type[KeyProvider]] = {}
    for batch in pm.hook.sidecrypt_key_provider_types():
        for cls in batch:
            name = getattr(cls, "type_name", None)
            if not isinstance(name, str):
                raise PluginError(f"key provider class {cls!r} has no type_name")
            if name in found and found[name] is not cls:
                raise PluginError(f"key provider type {name!r} is offered by two plugins")
            found[name] = cls
    return found


def build_providers(
    settings: Settings,
    pm: pluggy.PluginManager,
    stores: Mapping[str, Store] | None = None,
) -> dict[str, KeyProvider]:
    """One provider per ``keys.<name>`` block, options validated against its type's model.

    A key with ``hierarchy:`` gets a :class:`HierarchicalProvider` around its provider, on
    the named store from ``stores`` (the app's, started before the providers). Without
    ``stores`` (CLI, offline), each such provider builds, starts and closes its own store.
    """
    types = provider_types(pm)
    options = validate_provider_options(
        settings, lambda kind: types[kind].options_model if kind in types else None
    )
    out: dict[str, KeyProvider] = {}
    own: dict[str, Store] | None = None
    for name, opts in options.items():
        provider = types[settings.keys[name]["provider"]].create(
            name, opts, base_dir=settings.base_dir
        )
        hierarchy = getattr(opts, "hierarchy", None)
        if hierarchy is not None:
            if hierarchy.store not in settings.stores:
                raise ConfigError(
                    f"no store named {hierarchy.store!r} (add it under stores:)",
                    file=settings.source,
                    path=f"keys.{name}.hierarchy.store",
                )
            if stores is None:
                own = own if own is not None else build_stores(settings, pm)
                provider = _hierarchical(provider, hierarchy, own[hierarchy.store], owned=True)
            else:
                provider = _hierarchical(provider, hierarchy, stores[hierarchy.store], owned=False)
        out[name] = provider
    return out


def _hierarchical(
    provider: KeyProvider, options: HierarchyOptions, store: Store, *, owned: bool
) -> KeyProvider:
    from .crypto.hierarchy import branch_keys
    from .crypto.hierarchy.provider import HierarchicalProvider

    # The store's table exists once it has started, hence the late lookup.
    return HierarchicalProvider(  # type: ignore[return-value]
        provider,
        options,
        lambda: branch_keys(store),
        lifecycle=(store.start, store.close) if owned else None,
    )


def store_types(pm: pluggy.PluginManager) -> dict[str, type[Store]]:
    """Store classes by ``type_name``; a name offered twice is an error."""
    found: dict[str, type[Store]] = {}
    for batch in pm.hook.sidecrypt_store_types():
        for cls in batch:
            name = getattr(cls, "type_name", None)
            if not isinstance(name, str):
                raise PluginError(f"store class {cls!r} has no type_name")
            if name in found and found[name] is not cls:
                raise PluginError(f"store type {name!r} is offered by two plugins")
            found[name] = cls
    return found


def build_stores(settings: Settings, pm: pluggy.PluginManager) -> dict[str, Store]:
    """One store per ``stores.<name>`` block, options validated against its type's model."""
    types = store_types(pm)
    options = validate_store_options(
        settings, lambda kind: types[kind].options_model if kind in types else None
    )
    return {
        name: types[settings.stores[name]["type"]].create(name, opts, base_dir=settings.base_dir)
        for name, opts in options.items()
    }
