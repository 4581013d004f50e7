"""Algorithm suites: the table of the ESDK specification (framework/algorithm-suites.md)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import fail


@dataclass(frozen=True, slots=True)
class Suite:
    """One suite: key length, KDF hash (None: the data key is used as is), signing, version."""

    id: int
    key_bytes: int
    kdf: type[hashes.HashAlgorithm] | None
    curve: type[ec.EllipticCurve] | None
    sign_hash: type[hashes.HashAlgorithm] | None
    committing: bool

    @property
    def version(self) -> int:
        """The message format version this suite is written in."""
        return 2 if self.committing else 1

    @property
    def signed(self) -> bool:
        return self.curve is not None

    @property
    def id_bytes(self) -> bytes:
        return self.id.to_bytes(2, "big")


_SUITES = (
    Suite(0x0014, 16, None, None, None, False),
    Suite(0x0046, 24, None, None, None, False),
    Suite(0x0078, 32, None, None, None, False),
    Suite(0x0114, 16, hashes.SHA256, None, None, False),
    Suite(0x0146, 24, hashes.SHA256, None, None, False),
    Suite(0x0178, 32, hashes.SHA256, None, None, False),
    Suite(0x0214, 16, hashes.SHA256, ec.SECP256R1, hashes.SHA256, False),
    Suite(0x0346, 24, hashes.SHA384, ec.SECP384R1, hashes.SHA384, False),
    Suite(0x0378, 32, hashes.SHA384, ec.SECP384R1, hashes.SHA384, False),
    Suite(0x0478, 32, hashes.SHA512, None, None, True),
    Suite(0x0578, 32, hashes.SHA512, ec.SECP384R1, hashes.SHA384, True),
)
SUITES: dict[int, Suite] = {s.id: s for s in _SUITES}
DEFAULT_SUITE = SUITES[0x0478]  # AES_256_GCM_HKDF_SHA512_COMMIT_KEY
SIGNED_SUITE = SUITES[0x0578]  # AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
SUITE_NAMES = {
    "AES_256_GCM_HKDF_SHA512_COMMIT_KEY": DEFAULT_SUITE,
    "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384": SIGNED_SUITE,
}


def suite_by_id(suite_id: int, *, version: int) -> Suite:
    """The suite a header names; it must belong to the header's format version."""
    suite = SUITES.get(suite_id)
    if suite is None or suite.version != version:
        raise fail()
    return suite
