"""Message-level edges: frame boundaries (empty final frames), the official SDK reading them,
context reconciliation rules, and suite/version mismatches refused."""

from __future__ import annotations

import os
import struct

import aws_encryption_sdk  # type: ignore[import-untyped]
import pytest
from aws_encryption_sdk.exceptions import (  # type: ignore[import-untyped]
    AWSEncryptionSDKClientError,
)
from aws_encryption_sdk.identifiers import (  # type: ignore[import-untyped]
    CommitmentPolicy,
    EncryptionKeyType,
    WrappingAlgorithm,
)
from aws_encryption_sdk.key_providers.raw import (  # type: ignore[import-untyped]
    RawMasterKeyProvider,
    WrappingKey,
)
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecrypt.crypto.esdk import EsdkError, sign
from sidecrypt.crypto.esdk.message import Materials, decrypt_message, encrypt_message
from sidecrypt.crypto.esdk.raw_aes import RawAesKeyring
from sidecrypt.crypto.esdk.suites import DEFAULT_SUITE, SIGNED_SUITE

KEK = os.urandom(32)
RING = RawAesKeyring("ns", "k", [AESGCM(KEK)])


class _Provider(RawMasterKeyProvider):  # type: ignore[misc]
    provider_id = "ns"

    def _get_raw_key(self, key_id: bytes) -> WrappingKey:
        return WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=KEK,
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        )


SDK_KEYS = _Provider()
SDK_KEYS.add_master_key(b"k")
SDK_ERRORS = (AWSEncryptionSDKClientError, InvalidSignature, InvalidTag)
CLIENT = aws_encryption_sdk.EncryptionSDKClient(
    commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
)


def _materials(context: dict[str, str], *, signed: bool = False) -> Materials:
    suite = SIGNED_SUITE if signed else DEFAULT_SUITE
    key = None
    context = dict(context)
    if signed:
        key, public = sign.new_signing_key(suite)
        context[sign.PUBLIC_KEY_NAME] = public
    dek = os.urandom(32)
    return Materials(suite, dek, context, RING.wrap(dek, context).serialise(), 1, key)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 129, 384, 1000])
@pytest.mark.parametrize("signed", [False, True])
def test_frame_boundaries_round_trip_and_sdk_reads(size: int, signed: bool) -> None:
    plaintext = os.urandom(size)
    message = encrypt_message(plaintext, _materials({"a": "b"}, signed=signed), frame_length=128)
    assert decrypt_message(message, RING.unwrap).plaintext == plaintext
    assert CLIENT.decrypt(source=message, key_provider=SDK_KEYS)[0] == plaintext
    with pytest.raises(EsdkError):
        decrypt_message(message + b"\x00", RING.unwrap)  # trailing bytes


def test_reproduced_context_must_agree() -> None:
    message = encrypt_message(b"v", _materials({"a": "b"}))
    assert decrypt_message(message, RING.unwrap, reproduced={"a": "b"}).plaintext == b"v"
    with pytest.raises(EsdkError):
        decrypt_message(message, RING.unwrap, reproduced={"a": "c"})
    with pytest.raises(EsdkError):  # an extra pair would have to be authenticated: it is not
        decrypt_message(message, RING.unwrap, reproduced={"a": "b", "x": "y"})


def test_public_key_pair_must_match_the_suite() -> None:
    unsigned_with_key = _materials({sign.PUBLIC_KEY_NAME: "AAAA"})
    with pytest.raises(EsdkError):
        decrypt_message(encrypt_message(b"v", unsigned_with_key), RING.unwrap)


def test_suite_of_the_other_version_refused() -> None:
    message = bytearray(encrypt_message(b"v", _materials({})))
    message[1:3] = struct.pack(">H", 0x0178)  # a version-1 suite in a version-2 header
    with pytest.raises(EsdkError):
        decrypt_message(bytes(message), RING.unwrap)


def test_every_flipped_byte_fails_on_both_sides() -> None:
    message = encrypt_message(b'"v"', _materials({"t": "a"}, signed=True), frame_length=128)
    for i in range(len(message)):
        bad = message[:i] + bytes([message[i] ^ 0x40]) + message[i + 1 :]
        with pytest.raises(EsdkError):
            decrypt_message(bad, RING.unwrap)
        with pytest.raises(SDK_ERRORS):
            CLIENT.decrypt(source=bad, key_provider=SDK_KEYS)
