"""The field ciphertext format: one JSON value becomes one ``sc1.`` string.

A legacy app must be able to store the result where a string was, so everything needed to
decrypt travels inside the token: provider type, key name and version, the encryption context,
the wrapped data key, the nonce and the AES-256-GCM ciphertext. The header bytes, which include
the context, and the field label are the AAD: a token moved to another field, tenant or key
fails to authenticate. Byte layout and a test vector: docs/format.md.
"""

from __future__ import annotations

import binascii
import itertools
import json
import math
import os
import re
import struct
from functools import lru_cache
from typing import Any, NamedTuple

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import keys
from .errors import CryptoError

PREFIX = "sc1."
VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_NAME_BYTES = 255
MAX_PROVIDER_BYTES = 32
MAX_CONTEXT_PAIRS = 255
MAX_CONTEXT_VALUE_BYTES = 0xFFFF
MAX_LABEL_BYTES = 0xFFFF

_PROVIDER = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,31}")
_B64URL = re.compile(r"[A-Za-z0-9_\-]*")
_TO_STD = bytes.maketrans(b"-_", b"+/")
# Decoding: base64url to standard, and '+', '/', '=' to a character strict base64 refuses, so
# one translate plus a strict decode accept exactly the unpadded base64url alphabet.
_FROM_URL = bytes.maketrans(b"-_+/=", b"+/!!!")
_TO_URL = bytes.maketrans(b"+/", b"-_")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# Unused low bits of the last base64 character must be zero, so each payload has one spelling.
_B64_INDEX = {
    c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}

# orjson reads integers outside [-2**63, 2**64) as floats; a run of 19 digits is the cheap
# tell that the stdlib parser (exact big ints) must be used instead.
_DIGITS = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_RUN = b"0" * 19


def dumps_json(value: Any) -> bytes:
    """Serialise compactly; integers beyond 64 bits fall back to the stdlib encoder."""
    try:
        return orjson.dumps(value)
    except TypeError:
        try:
            return json.dumps(
                value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
        except (TypeError, ValueError) as exc:
            raise CryptoError(
                f"value cannot be serialised as JSON ({type(exc).__name__})"
            ) from None


def loads_json(data: bytes) -> Any:
    """Parse JSON keeping big integers exact. Raises ValueError on malformed input."""
    if _LONG_RUN in data.translate(_DIGITS):
        # Refuse what orjson refuses: 1e999 (would become inf, then null), lone surrogates,
        # nesting deep enough to exhaust the stack.
        try:
            doc = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
            if b"\\ud" in data.lower():
                json.dumps(doc, ensure_ascii=False).encode()
        except RecursionError:
            raise ValueError("JSON is nested too deeply") from None
        except UnicodeEncodeError:
            raise ValueError("JSON string holds a lone surrogate") from None
        return doc
    return orjson.loads(data)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class Envelope(NamedTuple):
    """A parsed token (immutable; a NamedTuple is cheaper to build than a frozen dataclass).

    Nothing here is secret: the data key is wrapped.
    """

    version: int
    provider: str
    key_name: str
    key_version: int
    context: keys.Context
    wrapped: bytes
    nonce: bytes
    ciphertext: bytes
    header: bytes


def is_envelope(value: Any) -> bool:
    """Cheap check for the plaintext guard and legacy-row detection (no parsing)."""
    return isinstance(value, str) and value.startswith(PREFIX)


@lru_cache(maxsize=1024)
def build_header(
    provider: str, key_name: str, key_version: int, context: keys.Context, wrapped: bytes
) -> bytes:
    """Everything before the nonce. Memoised: one data key serves many fields.

    Holds only public parts (names, context, wrapped key), never key bytes.
    """
    if not _PROVIDER.fullmatch(provider):
        raise CryptoError("provider type must be 1-32 chars of [a-z0-9_.-]")
    name = key_name.encode()
    if not 0 < len(name) <= MAX_NAME_BYTES:
        raise CryptoError("key name must be 1-255 bytes")
    if not 0 <= key_version <= 0xFFFFFFFF:
        raise CryptoError("key version must fit in 32 bits")
    if len(context) > MAX_CONTEXT_PAIRS:
        raise CryptoError("encryption context has more than 255 entries")
    if not 0 < len(wrapped) <= keys.MAX_WRAPPED_BYTES:
        raise CryptoError("wrapped data key must be 1-4096 bytes")
    out = bytearray((VERSION, len(provider)))
    out += provider.encode("ascii")
    out.append(len(name))
    out += name
    out += _U32.pack(key_version)
    out.append(len(context))
    previous: bytes | None = None
    for k, v in sorted(context):
        kb, vb = k.encode(), v.encode()
        if not 0 < len(kb) <= MAX_NAME_BYTES or len(vb) > MAX_CONTEXT_VALUE_BYTES:
            raise CryptoError("encryption context names must be 1-255 bytes, values < 64 KiB")
        if kb == previous:
            raise CryptoError("encryption context has a duplicate name")
        previous = kb
        out.append(len(kb))
        out += kb
        out += _U16.pack(len(vb))
        out += vb
    out += _U16.pack(len(wrapped))
    out += wrapped
    return bytes(out)


def _label_aad(label: str) -> bytes:
    """The label's part of the AAD (u16 length, UTF-8). A route's labels repeat on every
    request, so short ones (field paths, never values) come from a bounded cache."""
    return _short_label_aad(label) if len(label) <= 64 else _encode_label(label)


def _encode_label(label: str) -> bytes:
    lb = label.encode()
    if len(lb) > MAX_LABEL_BYTES:
        raise CryptoError("field label is longer than 64 KiB")
    return _U16.pack(len(lb)) + lb


_short_label_aad = lru_cache(maxsize=1024)(_encode_label)


def seal(
    plaintext: bytes, aead: AESGCM, *, header: bytes, label: str, nonce: bytes | None = None
) -> str:
    """Encrypt serialised bytes into a token. ``nonce`` is only for test vectors."""
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    elif len(nonce) != NONCE_BYTES:
        raise CryptoError("nonce must be 12 bytes")
    aad = header + _label_aad(label)
    sealed = aead.encrypt(nonce, plaintext, aad)
    encoded = binascii.b2a_base64(header + nonce + sealed, newline=False)
    return PREFIX + encoded.translate(_TO_URL).rstrip(b"=").decode("ascii")


def encrypt_value(
    value: Any,
    *,
    key: keys.CachedKey,
    provider: str,
    key_name: str,
    context: keys.Context,
    label: str,
) -> str:
    """One JSON value -> one token under a cached data key (the service counts its uses)."""
    header = build_header(provider, key_name, key.key_version, context, key.wrapped)
    return seal(dumps_json(value), key.aead, header=header, label=label)


def _fail(what: str) -> CryptoError:
    return CryptoError(f"malformed field ciphertext: {what}", code="malformed_ciphertext")


def _decode(token: str) -> bytes:
    if not isinstance(token, str) or not token.startswith(PREFIX):
        raise _fail(f"missing {PREFIX!r} prefix")
    body = token[len(PREFIX) :]
    rem = len(body) % 4
    try:
        if rem == 1:
            raise ValueError
        raw = body.encode("ascii").translate(_FROM_URL)
        data = binascii.a2b_base64(raw + b"=" * (-rem % 4), strict_mode=True)
    except (ValueError, binascii.Error):  # UnicodeEncodeError is a ValueError
        raise _fail("not base64url without padding") from None
    if rem and _B64_INDEX[body[-1]] & (0x0F if rem == 2 else 0x03):
        raise _fail("non-canonical base64url")
    return data


def _header_end(data: bytes) -> int:
    """Walk the length prefixes only; the fields are decoded (and cached) by _header_fields."""
    try:
        pos = 2 + data[1]
        pos += 5 + data[pos]
        count = data[pos]
        pos += 1
        for _ in range(count):
            pos += 1 + data[pos]
            pos += 2 + (data[pos] << 8 | data[pos + 1])
        end = pos + 2 + (data[pos] << 8 | data[pos + 1])
    except IndexError:
        raise _fail("truncated header") from None
    if end > len(data):  # the wrapped key runs past the end: never a header (nor memoised)
        raise _fail("truncated header")
    return end


@lru_cache(maxsize=4096)
def _header_fields(header: bytes) -> tuple[str, str, int, keys.Context, bytes]:
    """Decode and validate a header; memoised because one data key's header repeats."""
    try:
        n = header[1]
        provider = header[2 : 2 + n].decode("ascii")
        pos = 2 + n
        if not _PROVIDER.fullmatch(provider):
            raise _fail("bad provider type")
        n = header[pos]
        if n == 0:
            raise _fail("empty key name")
        key_name = header[pos + 1 : pos + 1 + n].decode()
        pos += 1 + n
        (key_version,) = _U32.unpack_from(header, pos)
        pos += 4
        pairs = []
        count = header[pos]
        pos += 1
        for _ in range(count):
            n = header[pos]
            if n == 0:
                raise _fail("empty context name")
            k = header[pos + 1 : pos + 1 + n].decode()
            pos += 1 + n
            (n,) = _U16.unpack_from(header, pos)
            v = header[pos + 2 : pos + 2 + n].decode()
            pos += 2 + n
            pairs.append((k, v))
        (n,) = _U16.unpack_from(header, pos)
    except UnicodeDecodeError:
        raise _fail("invalid UTF-8 in header") from None
    if not 0 < n <= keys.MAX_WRAPPED_BYTES:
        raise _fail("wrapped data key length out of range")
    context = tuple(pairs)
    if count > 1 and any(a[0] >= b[0] for a, b in itertools.pairwise(context)):
        raise _fail("encryption context not in canonical order")
    return provider, key_name, key_version, context, header[pos + 2 :]


# The last header parse() decoded, with its fields. Tokens made under one data key share their
# header, and a header is self-delimiting (length-prefixed), so a token whose bytes start with a
# known header has exactly that header: a prefix compare replaces the walk, slice and lookup.
_last_header: tuple[bytes, tuple[str, str, int, keys.Context, bytes]] = (
    b"\xff",
    ("", "", 0, (), b""),
)


def parse(token: str) -> Envelope:
    """Decode and check a token's structure (not its authenticity: that is decrypt's job)."""
    global _last_header
    data = _decode(token)
    size = len(data)
    if size < 2:
        raise _fail("truncated")
    if data[0] != VERSION:
        raise CryptoError(
            f"unsupported field ciphertext version {data[0]}", code="malformed_ciphertext"
        )
    header, fields = _last_header
    if data.startswith(header):
        pos = len(header)
    else:
        pos = _header_end(data)
        header = data[:pos]
        fields = _header_fields(header)
        _last_header = (header, fields)
    if size - pos < NONCE_BYTES + TAG_BYTES:
        raise _fail("truncated")
    provider, key_name, key_version, context, wrapped = fields
    return Envelope(
        VERSION,
        provider,
        key_name,
        key_version,
        context,
        wrapped,
        data[pos : pos + NONCE_BYTES],
        data[pos + NONCE_BYTES :],
        header,
    )


def decrypt_value(env: Envelope, aead: AESGCM, label: str) -> Any:
    """Authenticate and decrypt; any mismatch (field, context, key, bytes) is a CryptoError."""
    try:
        aad = env.header + _label_aad(label)
        plaintext = aead.decrypt(env.nonce, env.ciphertext, aad)
    except InvalidTag:
        raise CryptoError(
            f"field {label} does not authenticate (tampered, or moved from another field, "
            "context or key)"
        ) from None
    try:
        return loads_json(plaintext)
    except ValueError:
        raise CryptoError(f"field {label} decrypted to invalid JSON") from None
