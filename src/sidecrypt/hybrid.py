"""Public-key wrapping of data keys, so clients that cannot call a key service can encrypt.

A client downloads the key's public JWK (``/.well-known/sidecrypt/keys``), makes a random 32-byte
data key, encrypts its field with it as usual, and wraps the data key with the public key; only
the holder of the private key (the sidecar) can unwrap it. The ``kid`` is ``"<key>:<version>"``;
the version goes into the field envelope like any key version.

Wrapped data key layouts (all integers big-endian):

``RSA-OAEP-256`` (RSA-3072 keys): the RSAES-OAEP ciphertext of the 32-byte data key, SHA-256 for
both the hash and MGF1, empty label: exactly what JOSE ``RSA-OAEP-256``, WebCrypto and AWS KMS
``RSAES_OAEP_SHA_256`` produce. 384 bytes. The encryption context is bound by the field AAD, not
by this wrap (KMS cannot take an OAEP label).

``ECDH-ES+HKDF-SHA256+A256GCM`` (P-256 keys): ``epk(65) || nonce(12) || ct(32) || tag(16)``,
125 bytes. ``epk`` is a fresh ephemeral P-256 public key, SEC1 uncompressed (0x04 || X || Y).
Z = ECDH(ephemeral private, recipient public) (the 32-byte X coordinate). The wrapping key is
HKDF-SHA256(ikm=Z, salt=none, info=LP("sidecrypt ecdh-es v1") || LP(epk) || LP(recipient SEC1
point), length=32). ``ct || tag`` is AES-256-GCM of the data key under it, AAD = :func:`wrap_aad`
with alg ``ECDH-ES+HKDF-SHA256+A256GCM``, so the wrap is bound to the kid and context.

``wrap_aad(alg, kid, context)`` = LP("sidecrypt wrap v1") || LP(alg) || LP(kid) || LP(k1) ||
LP(v1) || ... for context pairs sorted by name, where LP(s) = u16 length || UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import CryptoError
from .keyring import lp
from .keys import DataKey

ALG_AES = "A256GCM"
ALG_RSA = "RSA-OAEP-256"
ALG_ECDH = "ECDH-ES+HKDF-SHA256+A256GCM"
RSA_MIN_BITS = 2048
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_P256_POINT = 65


def wrap_aad(alg: str, kid: str, context: Mapping[str, str]) -> bytes:
    """AAD of a wrapped data key: binds algorithm, key id + version and encryption context."""
    return lp("sidecrypt wrap v1", alg, kid) + b"".join(
        lp(k, v) for k, v in sorted(context.items())
    )


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _wrapping_key(z: bytes, epk: bytes, recipient: bytes) -> AESGCM:
    info = lp("sidecrypt ecdh-es v1", epk, recipient)
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(z))


def wrap(public: PublicKey, kid: str, data_key: bytes, context: Mapping[str, str]) -> bytes:
    """Wrap a data key for the holder of the private key (the client side of the format)."""
    if isinstance(public, rsa.RSAPublicKey):
        return public.encrypt(data_key, _OAEP)
    if not isinstance(public.curve, ec.SECP256R1):
        raise CryptoError("only P-256 EC keys are supported")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    epk = _point(ephemeral.public_key())
    aead = _wrapping_key(ephemeral.exchange(ec.ECDH(), public), epk, _point(public))
    nonce = os.urandom(12)
    return epk + nonce + aead.encrypt(nonce, data_key, wrap_aad(ALG_ECDH, kid, context))


def unwrap(private: PrivateKey, kid: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
    """Unwrap with the private key; any mismatch is a CryptoError that names no secret."""
    fail = CryptoError(f"key {kid}: wrapped data key does not decrypt (tampered, or another key)")
    try:
        if isinstance(private, rsa.RSAPrivateKey):
            plaintext = private.decrypt(wrapped, _OAEP)
        else:
            if len(wrapped) != _P256_POINT + 12 + 32 + 16:
                raise fail
            epk, nonce, body = wrapped[:_P256_POINT], wrapped[65:77], wrapped[77:]
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), epk)
            z = private.exchange(ec.ECDH(), peer)
            aead = _wrapping_key(z, epk, _point(private.public_key()))
            plaintext = aead.decrypt(nonce, body, wrap_aad(ALG_ECDH, kid, context))
    except (ValueError, InvalidTag):
        raise fail from None
    if len(plaintext) != 32:
        raise fail
    return plaintext


def _b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64u_decode(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise CryptoError(f"invalid public JWK: {what} missing", code="invalid_jwk")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise CryptoError(
            f"invalid public JWK: {what} is not base64url", code="invalid_jwk"
        ) from None


def _int_bytes(n: int, size: int | None = None) -> bytes:
    return n.to_bytes(size or (n.bit_length() + 7) // 8, "big")


def to_jwk(public: PublicKey, kid: str) -> dict[str, str]:
    """The public JWK clients use: ``kid`` is ``"<key>:<version>"``, ``use`` is ``enc``."""
    if isinstance(public, rsa.RSAPublicKey):
        nums = public.public_numbers()
        return {
            "kty": "RSA",
            "kid": kid,
            "use": "enc",
            "alg": ALG_RSA,
            "n": _b64u(_int_bytes(nums.n)),
            "e": _b64u(_int_bytes(nums.e)),
        }
    point = public.public_numbers()
    return {
        "kty": "EC",
        "kid": kid,
        "use": "enc",
        "alg": ALG_ECDH,
        "crv": "P-256",
        "x": _b64u(_int_bytes(point.x, 32)),
        "y": _b64u(_int_bytes(point.y, 32)),
    }


def from_jwk(jwk: Mapping[str, Any]) -> tuple[PublicKey, str, int]:
    """Parse and check a public JWK: (public key, kid, key version)."""
    kid = jwk.get("kid")
    name, _, version = kid.rpartition(":") if isinstance(kid, str) else ("", "", "")
    if not name or not version.isdigit() or int(version) < 1:
        raise CryptoError("invalid public JWK: kid must be '<key>:<version>'", code="invalid_jwk")
    assert isinstance(kid, str)
    try:
        if jwk.get("kty") == "RSA" and jwk.get("alg", ALG_RSA) == ALG_RSA:
            n = int.from_bytes(_b64u_decode(jwk.get("n"), "n"), "big")
            e = int.from_bytes(_b64u_decode(jwk.get("e"), "e"), "big")
            public: PublicKey = rsa.RSAPublicNumbers(e, n).public_key()
            if public.key_size < RSA_MIN_BITS:
                raise ValueError("RSA key too small")
        elif (
            jwk.get("kty") == "EC"
            and jwk.get("crv") == "P-256"
            and jwk.get("alg", ALG_ECDH) == (ALG_ECDH)
        ):
            x, y = _b64u_decode(jwk.get("x"), "x"), _b64u_decode(jwk.get("y"), "y")
            if len(x) != 32 or len(y) != 32:
                raise ValueError("bad coordinate length")
            point = b"\x04" + x + y
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        else:
            raise ValueError("unsupported kty/crv/alg")
    except ValueError as exc:
        raise CryptoError(f"invalid public JWK: {exc}", code="invalid_jwk") from None
    return public, kid, int(version)


def wrap_for_jwk(jwk: Mapping[str, Any], context: Mapping[str, str]) -> DataKey:
    """Client side: a fresh data key wrapped for the JWK's owner, with the JWK's key version."""
    public, kid, version = from_jwk(jwk)
    data_key = os.urandom(32)
    return DataKey(data_key, wrap(public, kid, data_key, context), version)
