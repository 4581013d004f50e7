"""The plugin manager, the hook contract, and the example third-party plugin."""

from __future__ import annotations

import base64
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from tests.conftest import Certs

from sidecrypt import hookimpl, hookspecs
from sidecrypt.errors import PluginError
from sidecrypt.plugin_manager import describe_plugins, make_plugin_manager, provider_types

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("sidecrypt_")
]


def test_every_hookspec_is_documented_and_tested() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    tests = "\n".join(
        p.read_text()
        for p in (ROOT / "tests").rglob("test_*.py")
        if p.name != "test_plugin_manager.py"
    )
    assert HOOKS, "no hookspecs found"
    for name in HOOKS:
        assert re.search(rf"^### `{name}\(", docs, re.M), f"{name} has no entry in docs/plugins.md"
        assert name in tests, f"{name} is exercised by no test"


def test_misspelled_hookimpl_fails_startup() -> None:
    class Typo:
        @hookimpl
        def sidecrypt_identfy(self, request: Any) -> None:
            return None

    with pytest.raises(PluginError, match="sidecrypt_identfy"):
        make_plugin_manager([Typo()], entry_points=False)


def test_managers_are_not_shared() -> None:
    a = make_plugin_manager(entry_points=False)
    b = make_plugin_manager(entry_points=False)
    assert a is not b
    assert {"local"} <= set(provider_types(a))
    names = [p["name"] for p in describe_plugins(a)]
    assert "sidecrypt.plugins.local_keys" in names


def test_duplicate_provider_type_is_refused() -> None:
    local = provider_types(make_plugin_manager(entry_points=False))["local"]

    class Again:
        @hookimpl
        def sidecrypt_key_provider_types(self) -> list[Any]:
            return [type("Clash", (local,), {})]

    with pytest.raises(PluginError, match="two plugins"):
        provider_types(make_plugin_manager([Again()], entry_points=False))


def _example_module() -> ModuleType:
    path = ROOT / "examples" / "sidecrypt_example_plugin" / "sidecrypt_example_plugin.py"
    spec = importlib.util.spec_from_file_location("sidecrypt_example_plugin", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_example_plugin_provides_a_working_key_provider(
    certs: Certs, upstream: Any, proxy_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXAMPLE_KEK", base64.b64encode(os.urandom(32)).decode())
    example = _example_module()
    proxy = await proxy_factory(
        {
            "upstream": {"url": upstream.url},
            "keys": {"demo": {"provider": "env", "variable": "EXAMPLE_KEK"}},
            "routes": [
                {
                    "match": {"methods": ["POST"], "path": "/notes"},
                    "key": "demo",
                    "request": {"encrypt": ["$.secret"]},
                    "response": {"decrypt": ["$.secret"]},
                }
            ],
        },
        plugins=(example,),
    )
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/notes",
            json={"secret": "canary-example-plugin"},
            ssl=certs.client_context(),
        ) as r,
    ):
        assert r.status == 200
        assert (await r.json()) == {"secret": "canary-example-plugin"}
    assert b"canary-example-plugin" not in upstream.all_bytes()
    assert b"sc1." in upstream.seen[0].body
