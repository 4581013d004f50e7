"""The ESDK test vector in docs/format.md: rebuilt byte for byte and opened by the official SDK."""

from __future__ import annotations

import base64
import re
import struct
from pathlib import Path
from typing import Any

import aws_encryption_sdk  # type: ignore[import-untyped]
from aws_encryption_sdk.identifiers import (  # type: ignore[import-untyped]
    CommitmentPolicy,
    EncryptionKeyType,
    WrappingAlgorithm,
)
from aws_encryption_sdk.key_providers.raw import (  # type: ignore[import-untyped]
    RawMasterKeyProvider,
    WrappingKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecrypt.crypto.esdk.header import EncryptedDataKey, serialise_context
from sidecrypt.crypto.esdk.message import Materials, decrypt_message, encrypt_message
from sidecrypt.crypto.esdk.raw_aes import RawAesKeyring
from sidecrypt.crypto.esdk.suites import DEFAULT_SUITE

DOC = Path(__file__).parents[3] / "docs" / "format.md"
KEK, DEK = bytes(range(32)), bytes(range(32, 64))
MID, IV = bytes(range(64, 96)), bytes(range(96, 108))
CTX = {"tenant": "acme", "sidecrypt-field": "$.ssn"}


def _documented() -> bytes:
    text = DOC.read_text()
    section = text[text.index("# The `esdk` format") :]
    (b64,) = re.findall(r"^(AgR4[A-Za-z0-9+/=]+)$", section, re.M)
    return base64.b64decode(b64)


def test_vector_rebuilds_byte_for_byte() -> None:
    wrapped = AESGCM(KEK).encrypt(IV, DEK, serialise_context(CTX))
    edk = EncryptedDataKey(b"sidecrypt", b"app" + struct.pack(">II", 128, 12) + IV, wrapped)
    materials = Materials(DEFAULT_SUITE, DEK, CTX, edk.serialise(), 1)
    assert encrypt_message(b'"078-05-1120"', materials, message_id=MID) == _documented()
    ring = RawAesKeyring("sidecrypt", "app", [AESGCM(KEK)])
    assert decrypt_message(_documented(), ring.unwrap).plaintext == b'"078-05-1120"'


def test_official_sdk_opens_the_vector() -> None:
    class Provider(RawMasterKeyProvider):  # type: ignore[misc]
        provider_id = "sidecrypt"

        def _get_raw_key(self, key_id: bytes) -> Any:
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=KEK,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    keys = Provider()
    keys.add_master_key(b"app")
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
    )
    plaintext, header = client.decrypt(source=_documented(), key_provider=keys)
    assert plaintext == b'"078-05-1120"'
    assert header.encryption_context == CTX
