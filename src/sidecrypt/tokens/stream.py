"""Where token characters come from: a keyed deterministic stream, or the OS's randomness.

A consistent token is a pure function of (token key, blind index, attempt): the stream is
HMAC-SHA-256 in counter mode (``HMAC(k, index || attempt || counter)``, 32 bytes a block), the
way HMAC-DRBG and HKDF-Expand build output from HMAC. Choosing one of ``m`` symbols uses
rejection sampling, never ``byte % m`` over the full byte range, so every symbol is equally
likely. A random token draws from :func:`os.urandom` through the same sampler.
"""

from __future__ import annotations

import hmac
import os
import struct
from typing import Protocol

_U32 = struct.Struct(">I")
MAX_BLOCKS = 1 << 16  # a token needs a few blocks; this bound only stops a runaway loop


class ByteSource(Protocol):
    def read(self, n: int) -> bytes: ...


class RandomSource:
    """Bytes from the OS CSPRNG (random tokens)."""

    __slots__ = ()

    def read(self, n: int) -> bytes:
        return os.urandom(n)


class HmacStream:
    """A deterministic byte stream keyed by ``key`` and seeded by ``seed`` and ``attempt``."""

    __slots__ = ("_buf", "_counter", "_key", "_prefix")

    def __init__(self, key: bytes, seed: bytes, attempt: int) -> None:
        self._key = key
        self._prefix = seed + _U32.pack(attempt)
        self._counter = 0
        self._buf = b""

    def __repr__(self) -> str:
        return "HmacStream(<keyed>)"

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._counter >= MAX_BLOCKS:
                raise RuntimeError("token stream exhausted")
            block = hmac.digest(self._key, self._prefix + _U32.pack(self._counter), "sha256")
            self._counter += 1
            self._buf += block
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


class Sampler:
    """Uniform choices from a byte source (rejection sampling, no modulo bias)."""

    __slots__ = ("_buf", "_pos", "source")

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self._buf = b""
        self._pos = 0

    def _byte(self) -> int:
        if self._pos >= len(self._buf):
            self._buf = self.source.read(64)
            self._pos = 0
        b = self._buf[self._pos]
        self._pos += 1
        return b

    def below(self, m: int) -> int:
        """An integer uniform in [0, m), 1 <= m <= 256."""
        if not 1 <= m <= 256:
            raise ValueError("alphabet size must be 1..256")
        limit = 256 - (256 % m)  # bytes >= limit are rejected: each residue equally likely
        for _ in range(4096):  # P(4096 rejections) < 2**-4096 for m <= 256
            b = self._byte()
            if b < limit:
                return b % m
        raise RuntimeError("sampler made no progress")

    def choice(self, alphabet: str) -> str:
        return alphabet[self.below(len(alphabet))]

    def raw(self, n: int) -> bytes:
        """``n`` bytes straight from the source (UUID bits)."""
        out = bytearray()
        for _ in range(n):
            out.append(self._byte())
        return bytes(out)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")  # the one-shot C implementation
