"""Whole messages: encrypt with prepared materials, and the keyless half of decrypt.

Decrypt runs in this order, failing with one :class:`EsdkError` at the first problem: size
limit, header parse (with the encrypted data key limit), encryption context reconciliation,
data key from a keyring (the caller's part), commitment (constant time), header auth tag,
body frames, signature, no trailing bytes. Nothing is released before every check passed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import sign
from .body import decrypt_body, encrypt_framed
from .derive import check_commitment, derive
from .errors import fail
from .header import (
    IV_BYTES,
    MESSAGE_ID_V2,
    EncryptedDataKey,
    Header,
    parse_header,
    serialise_context,
    serialise_header,
)
from .suites import Suite

DEFAULT_FRAME_LENGTH = 4096
DEFAULT_MAX_EDKS = 16
DEFAULT_MAX_BYTES = 1 << 24
_ZERO_IV = bytes(IV_BYTES)


@dataclass(frozen=True, slots=True)
class Materials:
    """What one data key's messages share: suite, key, full context and the serialised EDKs.

    ``data_key`` is secret: no repr."""

    suite: Suite
    data_key: bytes
    context: Mapping[str, str]
    edks: bytes
    edk_count: int
    signing_key: ec.EllipticCurvePrivateKey | None = None

    def __repr__(self) -> str:
        return f"Materials(suite={self.suite.id:#06x}, edks={self.edk_count})"

    @property
    def context_bytes(self) -> bytes:
        return serialise_context(self.context)


def encrypt_message(
    plaintext: bytes,
    materials: Materials,
    *,
    frame_length: int = DEFAULT_FRAME_LENGTH,
    context_bytes: bytes | None = None,
    message_id: bytes | None = None,
) -> bytes:
    """A version 2 framed message (``message_id`` only for tests)."""
    suite = materials.suite
    if not suite.committing:
        raise fail()  # sidecrypt writes only committing suites
    mid = os.urandom(MESSAGE_ID_V2) if message_id is None else message_id
    key, commitment = derive(suite, materials.data_key, mid)
    if context_bytes is None:
        context_bytes = materials.context_bytes
    header = serialise_header(
        suite, mid, context_bytes, materials.edks, materials.edk_count, frame_length, commitment
    )
    aead = AESGCM(key)
    out = (
        header
        + aead.encrypt(_ZERO_IV, b"", header)
        + encrypt_framed(aead, mid, plaintext, frame_length)
    )
    if materials.signing_key is not None:
        out += sign.sign(materials.signing_key, suite, out)
    return out


def parse_message(
    data: bytes, *, max_edks: int = DEFAULT_MAX_EDKS, max_bytes: int = DEFAULT_MAX_BYTES
) -> Header:
    """The header, after the size limit (the EDK limit is checked while parsing)."""
    if len(data) > max_bytes:
        raise fail()
    header = parse_header(data, max_edks=max_edks)
    if header.suite.signed != (sign.PUBLIC_KEY_NAME in header.context):
        raise fail()
    return header


def reconcile_context(
    header: Header, reproduced: Mapping[str, str] | None
) -> tuple[dict[str, str], bytes]:
    """(full context for the keyring, required-only bytes for the header auth AAD).

    A reproduced pair stored in the header must have the stored value; a pair absent from the
    header is a required-only one (written by a required-encryption-context CMM): it is then
    authenticated by the header auth tag."""
    stored = header.context
    if not reproduced:
        return dict(stored), b""
    only: dict[str, str] = {}
    for key, value in reproduced.items():
        have = stored.get(key)
        if have is None:
            only[key] = value
        elif have != value:
            raise fail()
    if not only:
        return dict(stored), b""
    return {**stored, **only}, serialise_context(only)


def open_message(
    data: bytes,
    header: Header,
    data_key: bytes,
    *,
    required: bytes = b"",
    max_plaintext: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """Authenticate and decrypt with the unwrapped data key."""
    suite = header.suite
    key, commitment = derive(suite, data_key, header.message_id)
    if suite.committing:
        check_commitment(commitment, header.commitment)
    aead = AESGCM(key)
    try:
        aead.decrypt(header.auth_iv, header.auth_tag, header.body + required)
    except InvalidTag:
        raise fail() from None
    plaintext, end = decrypt_body(aead, header, data, max_plaintext)
    if suite.signed:
        sign.verify(header.context.get(sign.PUBLIC_KEY_NAME), suite, data[:end], data[end:])
    elif end != len(data):
        raise fail()
    return plaintext


Unwrap = Callable[[Suite, tuple[EncryptedDataKey, ...], Mapping[str, str]], "bytes | None"]


@dataclass(frozen=True, slots=True)
class DecryptResult:
    plaintext: bytes
    context: dict[str, str]
    suite: Suite


def decrypt_message(
    data: bytes,
    unwrap: Unwrap,
    *,
    reproduced: Mapping[str, str] | None = None,
    max_edks: int = DEFAULT_MAX_EDKS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> DecryptResult:
    """Synchronous decrypt with a keyring function (offline use, tests, vectors)."""
    header = parse_message(data, max_edks=max_edks, max_bytes=max_bytes)
    context, required = reconcile_context(header, reproduced)
    data_key = unwrap(header.suite, header.edks, context)
    if data_key is None or len(data_key) != header.suite.key_bytes:
        raise fail()
    plaintext = open_message(data, header, data_key, required=required, max_plaintext=max_bytes)
    return DecryptResult(plaintext, dict(header.context), header.suite)
