"""Content key derivation and key commitment (framework/algorithm-suites.md).

Version 2 (committing suites): the content key is HKDF(data key, salt = message id,
info = suite id || "DERIVEKEY") and the commitment HKDF(data key, salt = message id,
info = "COMMITKEY"), both 32 bytes under the suite's hash. Version 1: HKDF with no salt and
info = suite id || message id, or the data key itself for the suites without a KDF.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import fail
from .suites import Suite

_KEY_LABEL = b"DERIVEKEY"
_COMMIT_LABEL = b"COMMITKEY"
COMMITMENT_BYTES = 32


def derive(suite: Suite, data_key: bytes, message_id: bytes) -> tuple[bytes, bytes]:
    """(content key, commitment); the commitment is b'' for non-committing suites."""
    if len(data_key) != suite.key_bytes:
        raise fail()
    if suite.kdf is None:
        return data_key, b""
    if not suite.committing:
        info = suite.id_bytes + message_id
        return HKDF(suite.kdf(), suite.key_bytes, None, info).derive(data_key), b""
    key = HKDF(suite.kdf(), suite.key_bytes, message_id, suite.id_bytes + _KEY_LABEL)
    commit = HKDF(suite.kdf(), COMMITMENT_BYTES, message_id, _COMMIT_LABEL)
    return key.derive(data_key), commit.derive(data_key)


def check_commitment(expected: bytes, stored: bytes) -> None:
    """Constant-time compare: a message must commit to the one data key that opens it."""
    if not hmac.compare_digest(expected, stored):
        raise fail()
