"""The JWKS endpoint on a running sidecrypt's admin listener, over real sockets."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecrypt import hybrid
from sidecrypt.keyring import create_key, rotate_key
from sidecrypt.plugin_manager import make_plugin_manager
from sidecrypt.plugins import jwks

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k"}


@pytest.fixture(scope="module")
def keyring_template(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """One keyring with an RSA-3072, a P-256 and an AES key (RSA generation is slow: once)."""
    path = tmp_path_factory.mktemp("jwks") / "keyring.json"
    create_key(path, "card-rsa", kind="rsa3072")
    create_key(path, "tickets", kind="p256")
    create_key(path, "app")
    return path.read_bytes()


@pytest.fixture
def ring(keyring_template: bytes, tmp_path: Path) -> Path:
    path = tmp_path / "keyring.json"
    path.write_bytes(keyring_template)
    path.chmod(0o600)
    return path


def config(ring: Path, upstream_url: str, **extra_keys: Any) -> dict[str, Any]:
    local = {"provider": "local", "keyring": str(ring), "reload_interval": 0}
    return {
        "upstream": {"url": upstream_url},
        "keys": {
            "cards": {**local, "key": "card-rsa"},  # config name differs from the keyring name
            "tickets": local,
            "app": local,
            **{name: {**local, **opts} for name, opts in extra_keys.items()},
        },
    }


async def fetch(url: str) -> tuple[aiohttp.ClientResponse, Any]:
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        return resp, await resp.json()


Factory = Callable[..., Awaitable[Any]]


def test_registered_as_builtin_plugin() -> None:
    pm = make_plugin_manager(entry_points=False)
    assert pm.get_plugin("sidecrypt.plugins.jwks") is jwks


async def test_jwks_lists_public_keys_under_config_names(
    ring: Path, upstream: Any, proxy_factory: Factory
) -> None:
    proxy = await proxy_factory(config(ring, upstream.url), tls=False)
    resp, doc = await fetch(proxy.admin_url + jwks.PATH)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == f"public, max-age={jwks.MAX_AGE}"
    by_kid = {k["kid"]: k for k in doc["keys"]}
    assert sorted(by_kid) == ["cards:1", "tickets:1"]  # the AES key has no public half
    rsa_jwk, ec_jwk = by_kid["cards:1"], by_kid["tickets:1"]
    assert (rsa_jwk["kty"], rsa_jwk["alg"], rsa_jwk["use"]) == ("RSA", hybrid.ALG_RSA, "enc")
    assert (ec_jwk["kty"], ec_jwk["crv"], ec_jwk["alg"]) == ("EC", "P-256", hybrid.ALG_ECDH)
    for jwk in doc["keys"]:
        assert jwk[jwks.PROVIDER_MEMBER] == "local"
        assert not PRIVATE_MEMBERS & set(jwk)
        _public, kid, version = hybrid.from_jwk(jwk)
        assert version == 1 and kid == jwk["kid"]
    assert hybrid.from_jwk(rsa_jwk)[0].key_size == 3072  # type: ignore[union-attr]
    # The proxy listener does not answer it: that path is the upstream's there.
    async with aiohttp.ClientSession() as client, client.get(proxy.url + jwks.PATH) as resp:
        assert resp.status == 200 and (await resp.read()) == b""
    assert upstream.seen[-1].path_qs == jwks.PATH


async def test_rotation_shows_the_new_version_first(
    ring: Path, upstream: Any, proxy_factory: Factory
) -> None:
    proxy = await proxy_factory(config(ring, upstream.url), tls=False)
    rotate_key(ring, "card-rsa")
    _, doc = await fetch(proxy.admin_url + jwks.PATH)
    assert [k["kid"] for k in doc["keys"]] == ["cards:2", "cards:1", "tickets:1"]
    assert doc["keys"][0]["n"] != doc["keys"][1]["n"]


async def test_unready_key_is_left_out_the_others_stay(
    ring: Path, upstream: Any, proxy_factory: Factory, tmp_path: Path, keyring_template: bytes
) -> None:
    other = tmp_path / "other.json"
    other.write_bytes(keyring_template)
    other.chmod(0o600)
    raw = config(ring, upstream.url)
    raw["keys"]["tickets"]["keyring"] = str(other)
    proxy = await proxy_factory(raw, tls=False)
    os.chmod(other, 0o644)  # a keyring others can read is refused: fail closed
    resp, doc = await fetch(proxy.admin_url + jwks.PATH)
    assert resp.status == 200
    assert [k["kid"] for k in doc["keys"]] == ["cards:1"]


async def test_p256_key_under_another_config_name_is_not_published(
    ring: Path, upstream: Any, proxy_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A P-256 wrap binds the kid; the provider checks its keyring kid, so clients could not
    produce a wrap it opens under the config name."""
    raw = config(ring, upstream.url, events={"key": "tickets"})
    with caplog.at_level(logging.WARNING, logger="sidecrypt.plugins.jwks"):
        proxy = await proxy_factory(raw, tls=False)
        _, doc = await fetch(proxy.admin_url + jwks.PATH)
    assert [k["kid"] for k in doc["keys"]] == ["cards:1", "tickets:1"]
    warnings = [r.getMessage() for r in caplog.records if "'events'" in r.getMessage()]
    assert len(warnings) == 1 and "'tickets'" in warnings[0]


class _Stub:
    type_name = "stub"

    def __init__(self, *jwks_: dict[str, str]) -> None:
        self._jwks = list(jwks_)

    def public_jwks(self) -> list[dict[str, str]]:
        return self._jwks


async def test_publishable_rules() -> None:
    assert await jwks.publishable("x", object()) == ([], [])
    good = {"kty": "RSA", "kid": "inner:3", "alg": hybrid.ALG_RSA, "n": "AQAB", "e": "AQAB"}
    out, skipped = await jwks.publishable("outer", _Stub(good, {"kty": "RSA", "kid": "nonsense"}))
    assert [j["kid"] for j in out] == ["outer:3"] and out[0][jwks.PROVIDER_MEMBER] == "stub"
    assert len(skipped) == 1 and "kid" in skipped[0]
    ec = {"kty": "EC", "kid": "inner:1", "alg": hybrid.ALG_ECDH}
    assert (await jwks.publishable("outer", _Stub(ec)))[0] == []
    assert [j["kid"] for j in (await jwks.publishable("inner", _Stub(ec)))[0]] == ["inner:1"]
