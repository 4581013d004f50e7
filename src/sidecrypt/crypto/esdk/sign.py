"""Signed suites: ECDSA over header, header auth and body; the footer carries the signature
(data-format/message-footer.md). The verification key travels in the encryption context as
``aws-crypto-public-key``: base64 of the compressed curve point."""

from __future__ import annotations

import base64
import binascii
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import fail
from .suites import Suite

PUBLIC_KEY_NAME = "aws-crypto-public-key"
_U16 = struct.Struct(">H")


def new_signing_key(suite: Suite) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh key pair for one data key's messages, and its public key for the context."""
    assert suite.curve is not None
    private = ec.generate_private_key(suite.curve())
    point = private.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    return private, base64.b64encode(point).decode("ascii")


def sign(private: ec.EllipticCurvePrivateKey, suite: Suite, data: bytes) -> bytes:
    """The footer: u16 length, then the DER signature."""
    assert suite.sign_hash is not None
    signature = private.sign(data, ec.ECDSA(suite.sign_hash()))
    return _U16.pack(len(signature)) + signature


def verify(public_b64: str | None, suite: Suite, data: bytes, footer: bytes) -> None:
    """Check the footer (exactly: nothing may follow it) against the context's public key."""
    assert suite.curve is not None and suite.sign_hash is not None
    if public_b64 is None or len(footer) < 2:
        raise fail()
    (length,) = _U16.unpack_from(footer, 0)
    if len(footer) != 2 + length:
        raise fail()
    try:
        point = base64.b64decode(public_b64, validate=True)
        public = ec.EllipticCurvePublicKey.from_encoded_point(suite.curve(), point)
        public.verify(footer[2:], data, ec.ECDSA(suite.sign_hash()))
    except (ValueError, binascii.Error, InvalidSignature):
        raise fail() from None
