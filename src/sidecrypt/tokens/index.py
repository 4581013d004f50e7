"""The keyed blind index and the token stream, both from one root key per vault key.

The root is a 32-byte data key that the route's key provider generated and wrapped; only the
wrapped form is stored. HKDF-SHA-256 derives two independent keys from it: one for the blind
index (HMAC-SHA-256 of scope and value: what the vault stores to find a value's consistent
token) and one for the token stream (what the token's characters are drawn from). Nothing
unkeyed is ever computed over a value.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .stream import HmacStream, Sampler, hmac_sha256

ROOT_BYTES = 32
INFO = b"sidecrypt tokens v1: blind index and token stream"
ROOT_CONTEXT = {"sidecrypt": "token-root"}  # the encryption context the root is wrapped under
_U32 = struct.Struct(">I")


def encode_parts(parts: Iterable[bytes]) -> bytes:
    """Length-prefixed concatenation: no two part lists encode alike."""
    out = bytearray()
    for part in parts:
        out += _U32.pack(len(part))
        out += part
    return bytes(out)


class TokenKeys:
    """The derived keys of one root. Key bytes never appear in a repr."""

    __slots__ = ("_index", "_stream", "key_name", "version")

    def __init__(self, root: bytes, *, key_name: str, version: int) -> None:
        if len(root) != ROOT_BYTES:
            raise ValueError("a token root key is 32 bytes")
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=key_name.encode(), info=INFO).derive(
            root
        )
        self._index, self._stream = okm[:32], okm[32:]
        self.key_name = key_name
        self.version = version

    def __repr__(self) -> str:
        return f"TokenKeys(key={self.key_name!r}, version={self.version})"

    def blind_index(self, scope: bytes, value: bytes) -> bytes:
        """HMAC-SHA-256 over the scope (key, format, context) and the value's canonical bytes."""
        return hmac_sha256(self._index, encode_parts((b"bidx", scope, value)))

    def sampler(self, bidx: bytes, attempt: int) -> Sampler:
        """The deterministic characters for a consistent token's ``attempt``-th candidate."""
        return Sampler(HmacStream(self._stream, bidx, attempt))
