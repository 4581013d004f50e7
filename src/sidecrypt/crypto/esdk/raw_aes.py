"""The raw AES keyring layout (framework/raw-aes-keyring.md), so an official SDK holding the
same 256-bit key under the same namespace and name unwraps what sidecrypt wraps.

EDK: provider id = key namespace; provider info = key name || tag length in bits (u32, 128) ||
IV length (u32, 12) || IV; ciphertext = AES-GCM(data key) || tag, with the serialised
encryption context (the full one, required-only pairs included) as AAD.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .header import IV_BYTES, TAG_BYTES, EncryptedDataKey, serialise_context
from .suites import Suite

_LENGTHS = struct.pack(">II", TAG_BYTES * 8, IV_BYTES)


class RawAesKeyring:
    """Wraps with the first key; unwraps with any (rotated versions under one name)."""

    def __init__(self, namespace: str, name: str, keys: Sequence[AESGCM]) -> None:
        self.namespace = namespace.encode()
        self.name = name.encode()
        self.keys = tuple(keys)

    def __repr__(self) -> str:
        return f"RawAesKeyring({self.namespace!r}, {self.name!r})"

    def wrap(self, data_key: bytes, context: Mapping[str, str]) -> EncryptedDataKey:
        iv = os.urandom(IV_BYTES)
        sealed = self.keys[0].encrypt(iv, data_key, serialise_context(context))
        return EncryptedDataKey(self.namespace, self.name + _LENGTHS + iv, sealed)

    def unwrap(
        self, suite: Suite, edks: Sequence[EncryptedDataKey], context: Mapping[str, str]
    ) -> bytes | None:
        aad: bytes | None = None
        prefix = self.name + _LENGTHS
        for edk in edks:
            info = edk.provider_info
            if (
                edk.provider_id != self.namespace
                or len(info) != len(prefix) + IV_BYTES
                or not info.startswith(prefix)
                or len(edk.ciphertext) != suite.key_bytes + TAG_BYTES
            ):
                continue
            if aad is None:
                aad = serialise_context(context)
            for key in self.keys:
                try:
                    return key.decrypt(info[len(prefix) :], edk.ciphertext, aad)
                except InvalidTag:
                    continue
        return None
