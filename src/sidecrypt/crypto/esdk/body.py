"""Message body: framed and non-framed (data-format/message-body.md, message-body-aad.md).

Every frame's AAD is message id || content string || sequence number || content length, so
frames cannot be reordered, dropped or moved to another message. Frame IVs are the sequence
number, left-padded to 12 bytes, as the SDKs write them (each content key is used for one
message only).
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import fail
from .header import FRAMED, IV_BYTES, TAG_BYTES, Header

_FRAME = b"AWSKMSEncryptionClient Frame"
_FINAL = b"AWSKMSEncryptionClient Final Frame"
_SINGLE = b"AWSKMSEncryptionClient Single Block"
_FINAL_MARK = b"\xff\xff\xff\xff"
_SEQ_LEN = struct.Struct(">IQ")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
MAX_NON_FRAMED = 2**36 - 32


def _iv(seq: int) -> bytes:
    return seq.to_bytes(IV_BYTES, "big")


def encrypt_framed(aead: AESGCM, message_id: bytes, plaintext: bytes, frame_length: int) -> bytes:
    out = bytearray()
    seq = 1
    pos = 0
    while len(plaintext) - pos >= frame_length:  # an exact multiple ends in an empty final frame
        chunk = plaintext[pos : pos + frame_length]
        aad = message_id + _FRAME + _SEQ_LEN.pack(seq, len(chunk))
        out += _U32.pack(seq) + _iv(seq) + aead.encrypt(_iv(seq), chunk, aad)
        seq += 1
        pos += frame_length
    chunk = plaintext[pos:]
    aad = message_id + _FINAL + _SEQ_LEN.pack(seq, len(chunk))
    out += _FINAL_MARK + _U32.pack(seq) + _iv(seq)
    out += _U32.pack(len(chunk)) + aead.encrypt(_iv(seq), chunk, aad)
    return bytes(out)


def _open(aead: AESGCM, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
    try:
        return aead.decrypt(iv, sealed, aad)
    except InvalidTag:
        raise fail() from None


def decrypt_body(
    aead: AESGCM, header: Header, data: bytes, max_plaintext: int
) -> tuple[bytes, int]:
    """(plaintext, offset after the body). Sizes are checked against the data before use."""
    pos = header.end
    mid = header.message_id
    size = len(data)
    if header.content_type != FRAMED:
        if pos + IV_BYTES + 8 > size:
            raise fail()
        iv = data[pos : pos + IV_BYTES]
        (length,) = _U64.unpack_from(data, pos + IV_BYTES)
        pos += IV_BYTES + 8
        if length > MAX_NON_FRAMED or length > max_plaintext or pos + length + TAG_BYTES > size:
            raise fail()
        aad = mid + _SINGLE + _SEQ_LEN.pack(1, length)
        end = pos + length + TAG_BYTES
        return _open(aead, iv, data[pos:end], aad), end
    frame = header.frame_length
    parts: list[bytes] = []
    total = 0
    seq = 1
    while True:
        if pos + 4 > size:
            raise fail()
        final = data[pos : pos + 4] == _FINAL_MARK
        if final:
            pos += 4
        if pos + 4 + IV_BYTES > size:
            raise fail()
        (got,) = _U32.unpack_from(data, pos)
        if got != seq:
            raise fail()
        iv = data[pos + 4 : pos + 4 + IV_BYTES]
        pos += 4 + IV_BYTES
        if final:
            if pos + 4 > size:
                raise fail()
            (length,) = _U32.unpack_from(data, pos)
            pos += 4
            if length > frame:
                raise fail()
        else:
            length = frame
        total += length
        if total > max_plaintext or pos + length + TAG_BYTES > size:
            raise fail()
        label = _FINAL if final else _FRAME
        aad = mid + label + _SEQ_LEN.pack(seq, length)
        end = pos + length + TAG_BYTES
        parts.append(_open(aead, iv, data[pos:end], aad))
        pos = end
        if final:
            return b"".join(parts), pos
        if seq == 0xFFFFFFFE:  # the next would need the final-frame marker as a number
            raise fail()
        seq += 1
