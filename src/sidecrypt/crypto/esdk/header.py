"""Message header: encryption context, encrypted data keys, version 1 and 2 layouts.

Specification: data-format/message-header.md and framework/structures.md (encryption context
serialisation). Parsing reads lengths before slicing, checks every limit before any key work and
raises only :class:`EsdkError`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from .errors import fail
from .suites import Suite, suite_by_id

FRAMED = 0x02
NON_FRAMED = 0x01
MESSAGE_ID_V1 = 16
MESSAGE_ID_V2 = 32
IV_BYTES = 12
TAG_BYTES = 16
MAX_FRAME_LENGTH = 2**31 - 1  # the SDKs' limit on a frame
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class EncryptedDataKey:
    """One wrapped data key: who can unwrap it (provider id and info) and the wrapped bytes."""

    provider_id: bytes
    provider_info: bytes
    ciphertext: bytes

    def serialise(self) -> bytes:
        out = bytearray()
        for part in (self.provider_id, self.provider_info, self.ciphertext):
            if len(part) > 0xFFFF:
                raise fail()
            out += _U16.pack(len(part))
            out += part
        return bytes(out)


def serialise_context(context: Mapping[str, str]) -> bytes:
    """Count, then (key, value) pairs sorted by the key's UTF-8 bytes; empty context: b''."""
    if not context:
        return b""
    pairs = sorted((k.encode(), v.encode()) for k, v in context.items())
    out = bytearray(_U16.pack(len(pairs)))
    for k, v in pairs:
        if not k or len(k) > 0xFFFF or len(v) > 0xFFFF:
            raise fail()
        out += _U16.pack(len(k)) + k + _U16.pack(len(v)) + v
    if len(out) > 0xFFFF:
        raise fail()
    return bytes(out)


def parse_context(data: bytes) -> dict[str, str]:
    if not data:
        return {}
    r = _Reader(data)
    out: dict[str, str] = {}
    for _ in range(r.u16()):
        key = r.text(r.u16())
        value = r.text(r.u16())
        if not key or key in out:
            raise fail()
        out[key] = value
    if r.pos != len(data):
        raise fail()
    return out


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed header; ``body`` is its exact bytes (the header-auth AAD and what is signed)."""

    suite: Suite
    message_id: bytes
    context: dict[str, str]
    edks: tuple[EncryptedDataKey, ...]
    section: bytes  # the serialised context and EDK list, as stored
    content_type: int
    frame_length: int
    commitment: bytes
    body: bytes
    auth_iv: bytes
    auth_tag: bytes
    end: int  # offset of the message body


def serialise_header(
    suite: Suite,
    message_id: bytes,
    context_bytes: bytes,
    edks: bytes,
    edk_count: int,
    frame_length: int,
    commitment: bytes,
) -> bytes:
    """A version 2 header body (framed); ``edks`` is the already serialised key list."""
    return b"".join(
        (
            b"\x02",
            suite.id_bytes,
            message_id,
            _U16.pack(len(context_bytes)),
            context_bytes,
            _U16.pack(edk_count),
            edks,
            bytes((FRAMED,)),
            _U32.pack(frame_length),
            commitment,
        )
    )


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise fail()
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise fail() from None


def _section_end(data: bytes, pos: int, max_edks: int) -> int:
    """End of the encryption context and EDK list that start at ``pos`` (lengths only); the
    EDK count limit is checked before the walk."""
    try:
        pos += 2 + (data[pos] << 8 | data[pos + 1])
        count = data[pos] << 8 | data[pos + 1]
        if not 0 < count <= max_edks:
            raise fail()
        pos += 2
        for _ in range(count):
            for _ in range(3):
                pos += 2 + (data[pos] << 8 | data[pos + 1])
    except IndexError:
        raise fail() from None
    if pos > len(data):
        raise fail()
    return pos


def _section(section: bytes, max_edks: int) -> tuple[dict[str, str], tuple[EncryptedDataKey, ...]]:
    """Context and EDKs; sections of typical size are memoised (every message under one data
    key repeats these bytes), big ones are not, so the cache stays small. The dict may be
    shared between callers: treat it as read-only."""
    if len(section) <= _CACHED_SECTION:
        return _cached_section(section, max_edks)
    return _parse_section(section, max_edks)


def _parse_section(
    section: bytes, max_edks: int
) -> tuple[dict[str, str], tuple[EncryptedDataKey, ...]]:
    r = _Reader(section)
    context = parse_context(r.take(r.u16()))
    count = r.u16()
    if not 0 < count <= max_edks:
        raise fail()
    edks = tuple(
        EncryptedDataKey(r.take(r.u16()), r.take(r.u16()), r.take(r.u16())) for _ in range(count)
    )
    return context, edks


_CACHED_SECTION = 2048  # bytes: a KMS EDK is ~200, a raw AES one ~100; 1024 entries at most
_cached_section = lru_cache(maxsize=1024)(_parse_section)


def parse_header(data: bytes, *, max_edks: int) -> Header:
    """Parse the header and header-auth fields of a version 1 or 2 message."""
    r = _Reader(data)
    version = r.u8()
    if version == 1:
        if r.u8() != 0x80:  # message type: customer authenticated encrypted data
            raise fail()
        suite = suite_by_id(r.u16(), version=1)
        message_id = r.take(MESSAGE_ID_V1)
    elif version == 2:
        suite = suite_by_id(r.u16(), version=2)
        message_id = r.take(MESSAGE_ID_V2)
    else:
        raise fail()
    end = _section_end(data, r.pos, max_edks)
    section = data[r.pos : end]
    context, edks = _section(section, max_edks)
    r.pos = end
    content_type = r.u8()
    if version == 1 and (r.take(4) != b"\x00\x00\x00\x00" or r.u8() != IV_BYTES):
        raise fail()  # v1: reserved bytes are zero, the IV length is 12
    frame_length = r.u32()
    if content_type == FRAMED:
        if not 0 < frame_length <= MAX_FRAME_LENGTH:
            raise fail()
    elif content_type != NON_FRAMED or frame_length != 0:
        raise fail()
    commitment = r.take(32) if suite.committing else b""
    body = data[: r.pos]
    auth_iv = r.take(IV_BYTES) if version == 1 else bytes(IV_BYTES)
    auth_tag = r.take(TAG_BYTES)
    return Header(
        suite,
        message_id,
        context,
        edks,
        section,
        content_type,
        frame_length,
        commitment,
        body,
        auth_iv,
        auth_tag,
        r.pos,
    )
