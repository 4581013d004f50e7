"""The official ``aws-encryption-sdk`` reads what sidecrypt writes, and the reverse.

Raw AES: a local keyring key, and an SDK raw master key provider holding the same material
under the same namespace and name. KMS: a real moto_server; the SDK's KMS master key gets a
boto3 client pointed at it. Signed and unsigned suites, with and without an encryption
context; a flipped byte anywhere in a message fails on both sides.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aws_encryption_sdk  # type: ignore[import-untyped]
import pytest
from aws_encryption_sdk.exceptions import (  # type: ignore[import-untyped]
    AWSEncryptionSDKClientError,
)
from aws_encryption_sdk.identifiers import (  # type: ignore[import-untyped]
    Algorithm,
    CommitmentPolicy,
    EncryptionKeyType,
    WrappingAlgorithm,
)
from aws_encryption_sdk.key_providers.kms import (  # type: ignore[import-untyped]
    KMSMasterKey,
    KMSMasterKeyConfig,
)
from aws_encryption_sdk.key_providers.raw import (  # type: ignore[import-untyped]
    RawMasterKeyProvider,
    WrappingKey,
)
from cryptography.exceptions import InvalidSignature, InvalidTag
from tests.kms_server import REGION, KmsServer

from sidecrypt import keyring
from sidecrypt.crypto.esdk import EsdkError, is_esdk_message
from sidecrypt.crypto.esdk.service import FIELD_NAME
from sidecrypt.keys import DataKeyService, KeyProvider, canonical_context
from sidecrypt.plugins.aws_kms import KmsKeyProvider
from sidecrypt.plugins.local_keys import LocalKeyProvider
from sidecrypt.proxy.fields import FieldCrypto
from sidecrypt.proxy.routes import adhoc_route

SIGNED = "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384"
UNSIGNED = "AES_256_GCM_HKDF_SHA512_COMMIT_KEY"
CLIENT = aws_encryption_sdk.EncryptionSDKClient(
    commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
)
SDK_ERRORS = (AWSEncryptionSDKClientError, InvalidSignature, InvalidTag)
CANARY = {"ssn": "123-45-canary", "n": [1, 2.5, True, None]}
CONTEXTS = [{}, {"tenant": "acme", "region": "eu"}]


def _raw_provider(material: bytes, namespace: str, name: str) -> Any:
    class Provider(RawMasterKeyProvider):  # type: ignore[misc]
        provider_id = namespace

        def _get_raw_key(self, key_id: bytes) -> Any:
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=material,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    provider = Provider()
    provider.add_master_key(name.encode())
    return provider


async def _local(tmp_path: Path, suite: str) -> tuple[LocalKeyProvider, bytes]:
    path = tmp_path / "keyring.json"
    if not path.exists():
        keyring.create_key(path, "app")
    block = {
        "provider": "local",
        "keyring": str(path),
        "key": "app",
        "format": "esdk",
        "esdk": {"suite": suite, "namespace": "acme-ns", "name": "app-key"},
    }
    provider = LocalKeyProvider.create("app", block, base_dir=tmp_path)
    await provider.start()
    entry = keyring.load(path).keys["app"]
    assert entry.primary.material is not None
    return provider, entry.primary.material


def _crypto(provider: KeyProvider) -> FieldCrypto:
    return FieldCrypto(DataKeyService({provider.name: provider}))


async def _seal(crypto: FieldCrypto, name: str, ctx: dict[str, str], value: Any) -> str:
    route = adhoc_route(name, ["$.v"], context=ctx or None)
    body = json.dumps({"v": value}).encode()
    out, labels = await crypto.encrypt_body(
        body, route, route.request_encrypt, canonical_context(ctx)
    )
    assert labels == ["$.v"]
    token = json.loads(out)["v"]
    assert is_esdk_message(token)
    return str(token)


async def _open(crypto: FieldCrypto, name: str, ctx: dict[str, str], token: str) -> Any:
    route = adhoc_route(name, ["$.v"], context=ctx or None)
    body = json.dumps({"v": token}).encode()
    out, _, _ = await crypto.decrypt_body(
        body, route, route.response_decrypt, canonical_context(ctx)
    )
    return json.loads(out)["v"]


async def _open_raw(crypto: FieldCrypto, ctx: dict[str, str], message: bytes) -> bytes:
    """The message path itself (a value not even detected as a message would pass through
    the body transform untouched, as legacy plaintext rows do)."""
    token = base64.b64encode(message).decode()
    return await crypto.esdk.open(token, label="$.v", context=canonical_context(ctx), allowed=None)


def _flips(message: bytes) -> list[bytes]:
    """A flipped bit in the header, the EDK, the commitment, the body and the last byte."""
    spots = sorted(
        {0, 3, 40, len(message) // 3, len(message) // 2, len(message) - 20, len(message) - 1}
    )
    return [message[:i] + bytes([message[i] ^ 0x01]) + message[i + 1 :] for i in spots]


@pytest.mark.parametrize("suite", [UNSIGNED, SIGNED])
@pytest.mark.parametrize("ctx", CONTEXTS, ids=["no-context", "context"])
async def test_raw_aes_both_ways(tmp_path: Path, suite: str, ctx: dict[str, str]) -> None:
    provider, material = await _local(tmp_path, suite)
    sdk_keys = _raw_provider(material, "acme-ns", "app-key")
    crypto = _crypto(provider)
    try:
        token = await _seal(crypto, "app", ctx, CANARY)
        message = base64.b64decode(token)
        plaintext, header = CLIENT.decrypt(source=message, key_provider=sdk_keys)
        assert json.loads(plaintext) == CANARY
        assert header.algorithm.algorithm_id == (0x0578 if suite == SIGNED else 0x0478)
        expected = {**ctx, FIELD_NAME: "$.v"}
        assert {k: v for k, v in header.encryption_context.items() if k in expected} == expected
        for bad in _flips(message):
            with pytest.raises(SDK_ERRORS):
                CLIENT.decrypt(source=bad, key_provider=sdk_keys)
            with pytest.raises(EsdkError):
                await _open_raw(crypto, ctx, bad)

        # The reverse: the SDK encrypts (its default is the signed committing suite).
        algorithm = Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
        for alg in (None, algorithm):
            sdk_message, _ = CLIENT.encrypt(
                source=json.dumps(CANARY).encode(),
                key_provider=sdk_keys,
                encryption_context=ctx,
                algorithm=alg,
            )
            sdk_token = base64.b64encode(sdk_message).decode()
            assert await _open(crypto, "app", ctx, sdk_token) == CANARY
            for bad in _flips(sdk_message):
                with pytest.raises(EsdkError):
                    await _open_raw(crypto, ctx, bad)
    finally:
        await provider.close()


@pytest.fixture
async def kms_provider(
    moto: KmsServer, aws_env: None
) -> AsyncIterator[Callable[[str], Awaitable[tuple[KmsKeyProvider, Any]]]]:
    made: list[KmsKeyProvider] = []
    meta = moto.create_key()

    async def make(suite: str) -> tuple[KmsKeyProvider, Any]:
        block = {
            "provider": "kms",
            "key_id": meta["KeyId"],
            "region": REGION,
            "endpoint_url": moto.url,
            "format": "esdk",
            "esdk": {"suite": suite},
        }
        provider = KmsKeyProvider.create("billing", block, base_dir=Path.cwd())
        await provider.start()
        made.append(provider)
        client = moto.boto3_client("kms")
        sdk_key = KMSMasterKey(config=KMSMasterKeyConfig(key_id=meta["Arn"], client=client))
        return provider, sdk_key

    yield make
    for provider in made:
        await provider.close()


@pytest.mark.parametrize("suite", [UNSIGNED, SIGNED])
@pytest.mark.parametrize("ctx", CONTEXTS, ids=["no-context", "context"])
async def test_kms_both_ways(
    kms_provider: Callable[[str], Awaitable[tuple[KmsKeyProvider, Any]]],
    suite: str,
    ctx: dict[str, str],
) -> None:
    provider, sdk_key = await kms_provider(suite)
    crypto = _crypto(provider)
    token = await _seal(crypto, "billing", ctx, CANARY)
    message = base64.b64decode(token)
    plaintext, header = CLIENT.decrypt(source=message, key_provider=sdk_key)
    assert json.loads(plaintext) == CANARY
    (edk,) = header.encrypted_data_keys
    assert edk.key_provider.provider_id == "aws-kms"
    for bad in _flips(message):
        with pytest.raises(SDK_ERRORS):
            CLIENT.decrypt(source=bad, key_provider=sdk_key)
        with pytest.raises(EsdkError):
            await _open_raw(crypto, ctx, bad)
    sdk_message, _ = CLIENT.encrypt(
        source=json.dumps(CANARY).encode(), key_provider=sdk_key, encryption_context=ctx
    )
    assert await _open(crypto, "billing", ctx, base64.b64encode(sdk_message).decode()) == CANARY
    for bad in _flips(sdk_message):
        with pytest.raises(EsdkError):
            await _open_raw(crypto, ctx, bad)


async def test_sdk_bodies_and_version_1_suites(tmp_path: Path) -> None:
    """Non-framed, many-frame and exact-multiple bodies, and version 1 messages (written by an
    SDK under FORBID_ENCRYPT_ALLOW_DECRYPT), all open; a signed one with a flipped bit does not."""
    provider, material = await _local(tmp_path, UNSIGNED)
    sdk_keys = _raw_provider(material, "acme-ns", "app-key")
    crypto = _crypto(provider)
    legacy = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT
    )
    raw = json.dumps({"blob": "x" * 1000}).encode()
    cases: list[tuple[Any, dict[str, Any]]] = [
        (CLIENT, {"frame_length": 0}),
        (CLIENT, {"frame_length": 128}),
        (CLIENT, {"frame_length": 1024, "source_pad": 1024 - len(raw)}),
        (legacy, {"algorithm": Algorithm.AES_256_GCM_IV12_TAG16_HKDF_SHA256}),
        (legacy, {"algorithm": Algorithm.AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384}),
        (legacy, {"algorithm": Algorithm.AES_128_GCM_IV12_TAG16, "frame_length": 0}),
    ]
    try:
        for client, extra in cases:
            pad = extra.pop("source_pad", 0)  # a body of exactly one frame: empty final frame
            source = json.dumps({"blob": "x" * (1000 + pad)}).encode()
            message, _ = client.encrypt(
                source=source, key_provider=sdk_keys, encryption_context=CONTEXTS[1], **extra
            )
            token = base64.b64encode(message).decode()
            assert is_esdk_message(token), extra
            assert await _open(crypto, "app", CONTEXTS[1], token) == json.loads(source)
            bad = message[:-30] + bytes([message[-30] ^ 1]) + message[-29:]
            with pytest.raises(EsdkError):
                await _open_raw(crypto, CONTEXTS[1], bad)
    finally:
        await provider.close()
