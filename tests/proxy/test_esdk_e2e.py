"""The ``esdk`` field format through the running proxy (real sockets and TLS, a real keyring).

Encrypt rules store ESDK messages that the official SDK opens with only the key material; the
route's context is in their header; decrypt rules open them and SDK-written messages alike,
refuse another tenant's, and the upstream never sees the canary.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import aws_encryption_sdk  # type: ignore[import-untyped]
from aiohttp import web
from aws_encryption_sdk.identifiers import (  # type: ignore[import-untyped]
    CommitmentPolicy,
    EncryptionKeyType,
    WrappingAlgorithm,
)
from aws_encryption_sdk.key_providers.raw import (  # type: ignore[import-untyped]
    RawMasterKeyProvider,
    WrappingKey,
)
from tests.conftest import Certs

from sidecrypt import hookimpl, keyring
from sidecrypt.crypto.esdk import is_esdk_message
from sidecrypt.events import AuditEvent

CANARY = "CANARY-esdk-e2e-41c2"
CLIENT = aws_encryption_sdk.EncryptionSDKClient(
    commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
)


def sdk_keys(material: bytes) -> Any:
    class Provider(RawMasterKeyProvider):  # type: ignore[misc]
        provider_id = "acme"

        def _get_raw_key(self, key_id: bytes) -> WrappingKey:
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=material,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    provider = Provider()
    provider.add_master_key(b"users")
    return provider


class Recorder:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    @hookimpl
    def sidecrypt_audit(self, event: AuditEvent) -> None:
        self.events.append(event)


async def test_esdk_fields_end_to_end(
    certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any
) -> None:
    ring = tmp_path / "keyring.json"
    keyring.create_key(ring, "app")
    material = keyring.load(ring).keys["app"].primary.material
    assert material is not None
    store: dict[str, Any] = {}

    async def app(request: web.Request, body: bytes) -> web.Response:
        if request.path == "/ingest":
            store["ingest"] = json.loads(body)
            return web.json_response({})
        if request.method == "POST":
            store["1"] = json.loads(body)
            return web.json_response(store["1"])
        return web.json_response(store.get(request.path.rsplit("/", 1)[1], {}))

    up = await upstream_factory(app)
    recorder = Recorder()
    raw = {
        "upstream": {"url": up.url},
        "keys": {
            "app": {
                "provider": "local",
                "keyring": "keyring.json",
                "format": "esdk",
                "esdk": {"namespace": "acme", "name": "users"},
            }
        },
        "routes": [
            {
                "match": {"methods": ["POST", "GET"], "path": "/users/**"},
                "key": "app",
                "context": {"tenant": "header:X-Tenant"},
                "request": {"encrypt": ["$.ssn"]},
                "response": {"decrypt": ["$.ssn"]},
            },
            {  # clients that encrypt with an SDK send messages the sidecar opens
                "match": {"methods": ["POST"], "path": "/ingest"},
                "key": "app",
                "context": {"tenant": "header:X-Tenant"},
                "request": {"decrypt": ["$.card"]},
            },
        ],
    }
    proxy = await proxy_factory(raw, base_dir=tmp_path, plugins=(recorder,))
    acme = {"X-Tenant": "acme"}
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        doc = {"ssn": {"v": CANARY, "n": 2**70}, "name": "Ada"}
        async with client.post(f"{proxy.url}/users/new", json=doc, headers=acme) as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.json() == doc
        stored = store["1"]["ssn"]
        assert is_esdk_message(stored)
        assert CANARY.encode() not in up.all_bytes()
        plain, header = CLIENT.decrypt(
            source=base64.b64decode(stored), key_provider=sdk_keys(material)
        )
        assert json.loads(plain) == doc["ssn"]
        assert header.encryption_context["tenant"] == "acme"

        async with client.get(f"{proxy.url}/users/1", headers={"X-Tenant": "evil"}) as resp:
            assert resp.status == 502
            body = await resp.text()
            assert "esdk_message_invalid" in body and CANARY not in body

        # A message an SDK client wrote (no field binding) opens through the decrypt rule.
        sdk_message, _ = CLIENT.encrypt(
            source=json.dumps([CANARY]).encode(),
            key_provider=sdk_keys(material),
            encryption_context={"tenant": "acme"},
        )
        store["2"] = {"ssn": base64.b64encode(sdk_message).decode()}
        async with client.get(f"{proxy.url}/users/2", headers=acme) as resp:
            assert resp.status == 200
            assert await resp.json() == {"ssn": [CANARY]}
        async with client.post(
            f"{proxy.url}/ingest", json={"card": store["2"]["ssn"]}, headers=acme
        ) as resp:
            assert resp.status == 200
        assert store["ingest"] == {"card": [CANARY]}
        flipped = bytearray(sdk_message)
        flipped[-40] ^= 1
        bad = base64.b64encode(bytes(flipped)).decode()
        async with client.post(f"{proxy.url}/ingest", json={"card": bad}, headers=acme) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "esdk_message_invalid"
        assert store["ingest"] == {"card": [CANARY]}  # the refused body never went upstream
    actions = [e.action for e in recorder.events]
    assert "generate_data_key" in actions and "decrypt_data_key" in actions
    assert CANARY not in repr(recorder.events)


async def test_esdk_folded_keys_are_sealed_and_the_guard_checks_them(
    certs: Certs,
    tmp_path: Path,
    upstream_factory: Any,
    proxy_factory: Any,
    monkeypatch: Any,
) -> None:
    """A key that folds to a selected name is sealed as an ESDK message; if a seal ever left a
    value as it was, the outgoing guard stops the body (500) before the upstream sees it."""
    keyring.create_key(tmp_path / "keyring.json", "app")
    got: list[Any] = []

    async def app(request: web.Request, body: bytes) -> web.Response:
        got.append(json.loads(body))
        return web.json_response({})

    up = await upstream_factory(app)
    raw = {
        "upstream": {"url": up.url},
        "keys": {
            "app": {
                "provider": "local",
                "keyring": "keyring.json",
                "format": "esdk",
                "esdk": {"namespace": "acme", "name": "users"},
            }
        },
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/users/**"},
                "key": "app",
                "request": {"encrypt": ["$.ssn"]},
            }
        ],
    }
    proxy = await proxy_factory(raw, base_dir=tmp_path)
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.post(f"{proxy.url}/users/1", json={"SSN": CANARY}) as resp:
            assert resp.status == 200, await resp.text()
        assert is_esdk_message(got[-1]["SSN"])

        from sidecrypt.crypto.esdk.service import EsdkFields

        async def leaky_seal(self: Any, name: str, context: Any, lab: str, plain: bytes) -> Any:
            return json.loads(plain)

        monkeypatch.setattr(EsdkFields, "seal", leaky_seal)
        async with client.post(f"{proxy.url}/users/1", json={"SSN": CANARY}) as resp:
            assert resp.status == 500
            assert (await resp.json())["error"]["code"] == "plaintext_guard"
    assert len(got) == 1 and CANARY.encode() not in up.all_bytes()
