"""ESDK-format fields through FieldCrypto: context and field binding, both formats on one
route, caching, limits before key work, fail-closed errors that never quote a value."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from sidecrypt import envelope, keyring
from sidecrypt.crypto.esdk import EsdkError, is_esdk_message
from sidecrypt.crypto.esdk.header import EncryptedDataKey
from sidecrypt.crypto.esdk.message import Materials, encrypt_message
from sidecrypt.crypto.esdk.suites import DEFAULT_SUITE
from sidecrypt.errors import CryptoError
from sidecrypt.events import AuditEvent
from sidecrypt.keys import DataKeyService, canonical_context
from sidecrypt.plugins.local_keys import LocalKeyProvider
from sidecrypt.proxy.fields import FieldCrypto, assert_no_plaintext
from sidecrypt.proxy.routes import adhoc_route, compile_fields

CANARY = "canary-esdk-5b1e"


async def _provider(tmp_path: Path, name: str, fmt: str, **esdk: Any) -> LocalKeyProvider:
    path = tmp_path / "keyring.json"
    keyring.create_key(path, name)
    block = {"provider": "local", "keyring": str(path), "key": name, "format": fmt}
    if esdk:
        block["esdk"] = esdk
    provider = LocalKeyProvider.create(name, block, base_dir=tmp_path)
    await provider.start()
    return provider


@pytest.fixture
async def crypto(tmp_path: Path) -> Any:
    events: list[AuditEvent] = []
    app = await _provider(tmp_path, "app", "esdk")
    old = await _provider(tmp_path, "old", "sc1")
    service = DataKeyService({"app": app, "old": old}, audit=events.append)
    fc = FieldCrypto(service)
    fc.events = events  # type: ignore[attr-defined]
    yield fc
    await app.close()
    await old.close()


CTX = {"tenant": "acme"}


async def _enc(fc: FieldCrypto, key: str, doc: dict[str, Any], ctx: dict[str, str] = CTX) -> Any:
    route = adhoc_route(key, ["$.a", "$.b"], context=ctx)
    out, _ = await fc.encrypt_body(
        json.dumps(doc).encode(), route, route.request_encrypt, canonical_context(ctx)
    )
    return json.loads(out)


async def _dec(
    fc: FieldCrypto, doc: dict[str, Any], ctx: dict[str, str] = CTX, **kw: Any
) -> tuple[Any, list[tuple[str, str]]]:
    route = adhoc_route("app", ["$.a", "$.b"], context=ctx, any_key=True, **kw)
    out, _, outcomes = await fc.decrypt_body(
        json.dumps(doc).encode(), route, route.response_decrypt, canonical_context(ctx)
    )
    return json.loads(out), outcomes


async def test_round_trip_types_and_one_data_key(crypto: FieldCrypto) -> None:
    doc = {"a": {"n": 2**70, "s": CANARY}, "b": [1, True, None]}
    for _ in range(20):
        sealed = await _enc(crypto, "app", doc)
        assert is_esdk_message(sealed["a"]) and is_esdk_message(sealed["b"])
        assert CANARY not in json.dumps(sealed)
        assert (await _dec(crypto, sealed))[0] == doc
    made = [e for e in crypto.events if e.action == "generate_data_key"]  # type: ignore[attr-defined]
    assert len(made) == 2  # one per (context, field): the field path is in the context
    stats = crypto.keys.stats
    assert stats["encrypt_misses"] == 2 and stats["encrypt_hits"] == 38
    assert stats["decrypt_misses"] == 2 and stats["decrypt_hits"] == 38


async def test_both_formats_on_one_route(crypto: FieldCrypto) -> None:
    a = (await _enc(crypto, "app", {"a": CANARY}))["a"]
    b = (await _enc(crypto, "old", {"b": 7}))["b"]
    assert envelope.is_envelope(b) and is_esdk_message(a)
    assert (await _dec(crypto, {"a": a, "b": b}))[0] == {"a": CANARY, "b": 7}


async def test_context_and_field_are_bound(crypto: FieldCrypto) -> None:
    token = (await _enc(crypto, "app", {"a": CANARY}))["a"]
    for doc, ctx in (({"a": token}, {"tenant": "evil"}), ({"b": token}, CTX)):
        with pytest.raises(EsdkError) as err:
            await _dec(crypto, doc, ctx)
        assert CANARY not in str(err.value) and err.value.code == "esdk_message_invalid"
    out, outcomes = await _dec(
        crypto, {"a": token}, {"tenant": "evil"}, on_decrypt_error="ciphertext"
    )
    assert out == {"a": token} and outcomes == [("$.a", "error")]


async def test_route_context_must_cover_the_message_context(crypto: FieldCrypto) -> None:
    token = (await _enc(crypto, "app", {"a": 1}, {"tenant": "acme", "extra": "x"}))["a"]
    with pytest.raises(EsdkError):
        await _dec(crypto, {"a": token})


async def test_reserved_context_names_refused(crypto: FieldCrypto) -> None:
    with pytest.raises(CryptoError):
        await _enc(crypto, "app", {"a": 1}, {"aws-crypto-public-key": "x"})


async def test_plaintext_guard_accepts_messages_only(crypto: FieldCrypto) -> None:
    specs = compile_fields(["$.a"])
    token = (await _enc(crypto, "app", {"a": 1}))["a"]
    assert_no_plaintext({"a": token}, specs)
    for fake in ("AgR4" + "A" * 10, "AgR4 not base64 " + "A" * 80, CANARY, 5):
        assert not is_esdk_message(fake)
        with pytest.raises(Exception, match="plaintext guard"):
            assert_no_plaintext({"a": fake}, specs)


def _message(edk_count: int, size: int = 10) -> str:
    edk = EncryptedDataKey(
        b"sidecrypt", b"app" + struct.pack(">II", 128, 12) + bytes(12), bytes(48)
    )
    materials = Materials(DEFAULT_SUITE, bytes(32), CTX, edk.serialise() * edk_count, edk_count)
    return base64.b64encode(encrypt_message(b"x" * size, materials)).decode()


async def test_limits_checked_before_key_work(crypto: FieldCrypto, monkeypatch: Any) -> None:
    calls = []
    monkeypatch.setattr(LocalKeyProvider, "esdk_wrapping_keys", lambda *a, **k: calls.append(1))
    with pytest.raises(EsdkError):
        await _dec(crypto, {"a": _message(17)})
    crypto.esdk.max_bytes = 4096
    with pytest.raises(EsdkError):
        await _dec(crypto, {"a": _message(1, 5000)})
    assert calls == []


async def test_truncations_and_garbage_are_one_error(crypto: FieldCrypto) -> None:
    token = (await _enc(crypto, "app", {"a": CANARY}))["a"]
    raw = base64.b64decode(token)
    for cut in range(0, len(raw), 7):
        piece = base64.b64encode(raw[:cut]).decode()
        with pytest.raises(EsdkError):
            await crypto.esdk.open(piece, label="$.a", context=None, allowed=None)
    with pytest.raises(EsdkError):
        await crypto.esdk.open(token + "!", label="$.a", context=None, allowed=None)


async def test_rewrap_moves_between_formats(crypto: FieldCrypto) -> None:
    specs = compile_fields(["$.a"])
    sc1 = (await _enc(crypto, "old", {"a": CANARY}))["a"]
    body, moved = await crypto.rewrap_body(json.dumps({"a": sc1}).encode(), specs, to_key="app")
    esdk = json.loads(body)["a"]
    assert is_esdk_message(esdk) and moved == [("$.a", "old", 1)]
    body, moved = await crypto.rewrap_body(body, specs, to_key="old")
    back = json.loads(body)["a"]
    assert envelope.is_envelope(back) and moved == [("$.a", "app", 0)]
    assert (await _dec(crypto, {"a": back}))[0] == {"a": CANARY}


def test_materials_repr_hides_the_key() -> None:
    materials = Materials(DEFAULT_SUITE, b"K" * 32, {}, b"", 0)
    assert "KKKK" not in repr(materials)


async def test_encrypt_cache_is_bounded(tmp_path: Path) -> None:
    """Contexts come from requests: the encrypt-side cache keeps at most decrypt_entries."""
    from sidecrypt.keys import CacheLimits

    app = await _provider(tmp_path, "app", "esdk")
    fc = FieldCrypto(DataKeyService({"app": app}, CacheLimits(decrypt_entries=3)))
    for i in range(10):
        await _enc(fc, "app", {"a": i}, {"tenant": f"t{i}"})
    assert len(fc.esdk._enc) == 3
    await app.close()
