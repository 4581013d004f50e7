"""Telling an ESDK message from a plaintext string or an ``sc1.`` token, cheaply.

A field holds standard base64 of the message. Every message starts with the version byte and
the suite id, so its base64 starts with one of a few four-character prefixes (``AgR4`` for
0x0478, ``AgV4`` for 0x0578, ``AYA`` + one of ``ABCD`` for version 1). Those prefixes plus a
minimum length and the base64 alphabet decide it; no ``sc1.`` token (it has a dot) and no
JSON-serialised plaintext sidecrypt writes could match.
"""

from __future__ import annotations

import binascii
import re

from .errors import fail

_V2 = re.compile(r"Ag[RV]4[A-Za-z0-9+/]{60,}={0,2}")  # 0x0478 / 0x0578, the committing suites
_V1 = re.compile(r"AYA[A-D][A-Za-z0-9+/]{60,}={0,2}")  # version 1, suites 0x00xx-0x03xx


def is_esdk_message(value: object) -> bool:
    """A string that is base64 of a version 1 or 2 message's start (not a full parse)."""
    if not isinstance(value, str) or len(value) % 4:
        return False
    return bool(_V2.fullmatch(value) or _V1.fullmatch(value))


def decode(value: str) -> bytes:
    """Strict standard base64 (padding required, nothing outside the alphabet)."""
    try:
        return binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (ValueError, binascii.Error):
        raise fail() from None
