"""A client that cannot call a key service encrypts a field with a published public key.

sidecrypt runs for real (TLS listener, admin listener, keyring files). The client fetches the
JWKS over a socket and builds its token exactly as docs/hybrid.md says: for the RSA key with
nothing but ``cryptography`` and the documented byte layout (proof that the docs suffice), for
the P-256 key with sidecrypt's public client functions. A route's request ``decrypt`` rule
opens the field, and the legacy app behind the sidecar receives plaintext.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecrypt import envelope, hybrid, keys
from sidecrypt.keyring import create_key

CARD = {"number": "4111111111111111", "exp": "12/29", "cvc": 737}
LABEL = "$.card"
TENANT = "acme"


# -- a client built from docs/hybrid.md and docs/format.md alone --------------------------------


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def str8(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def rsa_token_from_docs(jwk: dict[str, Any], value: Any, context: dict[str, str]) -> str:
    """RSA-OAEP-256 wrap of a random data key, then the sc1 payload, byte by byte."""
    public = rsa.RSAPublicNumbers(
        int.from_bytes(b64u_decode(jwk["e"]), "big"), int.from_bytes(b64u_decode(jwk["n"]), "big")
    ).public_key()
    name, _, version = jwk["kid"].rpartition(":")
    data_key = os.urandom(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = public.encrypt(data_key, oaep)
    header = b"\x01" + str8(jwk["sidecrypt_provider"].encode()) + str8(name.encode())
    header += int(version).to_bytes(4, "big") + bytes([len(context)])
    for k, v in sorted(context.items()):
        header += str8(k.encode()) + len(v.encode()).to_bytes(2, "big") + v.encode()
    header += len(wrapped).to_bytes(2, "big") + wrapped
    aad = header + len(LABEL.encode()).to_bytes(2, "big") + LABEL.encode()
    nonce = os.urandom(12)
    plaintext = json.dumps(value, separators=(",", ":")).encode()
    sealed = AESGCM(data_key).encrypt(nonce, plaintext, aad)
    return "sc1." + base64.urlsafe_b64encode(header + nonce + sealed).rstrip(b"=").decode()


def token_with_library(
    jwk: dict[str, Any],
    value: Any,
    context: dict[str, str],
) -> str:
    """The same with sidecrypt's public client functions."""
    dk = hybrid.wrap_for_jwk(jwk, context)
    name = jwk["kid"].rpartition(":")[0]
    ctx = keys.canonical_context(context)
    header = envelope.build_header(jwk["sidecrypt_provider"], name, dk.key_version, ctx, dk.wrapped)
    return envelope.seal(
        envelope.dumps_json(value), AESGCM(dk.plaintext), header=header, label=LABEL
    )


def move_to_context(token: str, context: dict[str, str]) -> str:
    """The same wrapped key, nonce and ciphertext under a header naming another context."""
    env = envelope.parse(token)
    ctx = keys.canonical_context(context)
    header = envelope.build_header(env.provider, env.key_name, env.key_version, ctx, env.wrapped)
    payload = header + env.nonce + env.ciphertext
    return "sc1." + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()


def tamper(token: str, pos: int = -5) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    old = token[pos]
    new = alphabet[(alphabet.index(old) + 1) % 64]
    return token[:pos] + new + token[pos:][1:]


# -- the running sidecar -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyring_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hybrid")
    rsa_ring, ec_ring = directory / "rsa.json", directory / "ec.json"
    create_key(rsa_ring, "card-rsa", kind="rsa3072")
    create_key(ec_ring, "tickets", kind="p256")
    for path in (rsa_ring, ec_ring):
        path.chmod(0o600)
    return directory


def route(path: str, key: str) -> dict[str, Any]:
    return {
        "match": {"methods": ["POST"], "path": path},
        "key": key,
        "context": {"tenant": "header:X-Tenant"},
        "request": {"decrypt": [LABEL]},
    }


Env = tuple[Any, Any, aiohttp.ClientSession, dict[str, dict[str, Any]]]


@pytest.fixture
async def env(
    keyring_file: Path, upstream: Any, proxy_factory: Callable[..., Awaitable[Any]], certs: Any
) -> AsyncIterator[Env]:
    proxy = await proxy_factory(
        {
            "upstream": {"url": upstream.url},
            "keys": {
                # The config name ("cards") is what envelopes carry, not the keyring name.
                "cards": {"provider": "local", "keyring": "rsa.json", "key": "card-rsa"},
                "tickets": {"provider": "local", "keyring": "ec.json"},
            },
            "routes": [route("/payments", "cards"), route("/tickets", "tickets")],
        },
        base_dir=keyring_file,
    )
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.get(f"{proxy.admin_url}/.well-known/sidecrypt/keys") as resp:
            assert resp.status == 200
            jwks = {jwk["kid"]: jwk for jwk in (await resp.json())["keys"]}
        yield proxy, upstream, client, jwks


async def post(env: Env, path: str, token: str, tenant: str = TENANT) -> aiohttp.ClientResponse:
    proxy, _, client, _ = env
    resp = await client.post(
        proxy.url + path, json={"card": token, "order": 17}, headers={"X-Tenant": tenant}
    )
    await resp.read()
    return resp


def received(env: Env) -> Any:
    return json.loads(env[1].seen[-1].body)


async def test_jwks_names_what_the_envelope_carries(env: Env) -> None:
    jwks = env[3]
    assert sorted(jwks) == ["cards:1", "tickets:1"]
    assert {j["sidecrypt_provider"] for j in jwks.values()} == {"local"}


async def test_rsa_token_built_from_the_docs_reaches_the_app_as_plaintext(env: Env) -> None:
    token = rsa_token_from_docs(env[3]["cards:1"], CARD, {"tenant": TENANT})
    assert envelope.parse(token).key_name == "cards"
    resp = await post(env, "/payments", token)
    assert resp.status == 200, await resp.text()
    assert received(env) == {"card": CARD, "order": 17}  # the type round-trips too


async def test_p256_token_built_with_the_library_reaches_the_app(env: Env) -> None:
    token = token_with_library(env[3]["tickets:1"], "seat 14C", {"tenant": TENANT})
    resp = await post(env, "/tickets", token)
    assert resp.status == 200, await resp.text()
    assert received(env) == {"card": "seat 14C", "order": 17}


async def test_rsa_token_with_the_library_matches_the_docs(env: Env) -> None:
    token = token_with_library(env[3]["cards:1"], CARD, {"tenant": TENANT})
    resp = await post(env, "/payments", token)
    assert resp.status == 200 and received(env)["card"] == CARD


@pytest.mark.parametrize("kid", ["cards:1", "tickets:1"])
@pytest.mark.parametrize("pos", [-5, 100])  # in the field ciphertext, in the wrapped key
async def test_tampered_token_is_refused_and_nothing_is_forwarded(
    env: Env, kid: str, pos: int
) -> None:
    path = "/payments" if kid == "cards:1" else "/tickets"
    token = token_with_library(env[3][kid], CARD, {"tenant": TENANT})
    before = len(env[1].seen)
    resp = await post(env, path, tamper(token, pos))
    assert resp.status >= 400
    assert (await resp.json())["error"]["code"] in ("decrypt_failed", "malformed_ciphertext")
    assert len(env[1].seen) == before


@pytest.mark.parametrize("kid", ["cards:1", "tickets:1"])
async def test_wrong_context_is_refused(env: Env, kid: str) -> None:
    path = "/payments" if kid == "cards:1" else "/tickets"
    before = len(env[1].seen)
    token = token_with_library(env[3][kid], CARD, {"tenant": TENANT})
    resp = await post(env, path, token, tenant="globex")  # another tenant's request
    assert resp.status >= 400
    assert (await resp.json())["error"]["code"] == "context_mismatch"
    # Someone rewrites the stored context to move the token to globex: the AAD no longer matches.
    moved = move_to_context(token, {"tenant": "globex"})
    resp = await post(env, path, moved, tenant="globex")
    assert resp.status >= 400 and (await resp.json())["error"]["code"] == "decrypt_failed"
    assert len(env[1].seen) == before
    assert CARD["number"].encode() not in env[1].all_bytes()


async def test_token_for_another_key_is_refused(env: Env) -> None:
    before = len(env[1].seen)
    token = token_with_library(env[3]["cards:1"], CARD, {"tenant": TENANT})
    resp = await post(env, "/tickets", token)
    assert resp.status >= 400 and (await resp.json())["error"]["code"] == "decrypt_failed"
    assert len(env[1].seen) == before
