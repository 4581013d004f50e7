"""The branch-wrapped data key layout and docs/format.md's vector 3, in both directions, and
its refusals (wrong layout, length, key, version, context)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecrypt import envelope
from sidecrypt.crypto.hierarchy.provider import WRAPPED_BYTES, open_data_key, seal_data_key
from sidecrypt.errors import CryptoError

BRANCH_KEY = AESGCM(bytes(range(0x40, 0x60)))
BRANCH_ID = bytes(range(0x10, 0x20)).hex()
CONTEXT = {"tenant": "acme"}
DATA_KEY = bytes(range(32))
WRAPPED = bytes.fromhex(
    "01101112131415161718191a1b1c1d1e1fc0c1c2c3c4c5c6c7c8c9cacb"
    "5f4532cd7e9f3bec7cb02e3da7aeacc28fe44c42ca3b381fe4aa29773467645971b123258952f2684489859d4dc25693"
)
TOKEN = (
    "sc1.AQZrbXMuYmsDYXBwAAAAAgEGdGVuYW50AARhY21lAE0BEBESExQVFhcYGRobHB0eH8DBwsPExcbHyMnKy19FMs1-nzvsfLAuPaeur"
    "MKP5ExCyjs4H-SqKXc0Z2RZcbEjJYlS8mhEiYWdTcJWkwAAAAAAAAAAAAAAACyNh-2YGLaQPp-RDDpe44Xo-gSNfau0FOjxdc_0"
)


def test_vector_3_both_ways() -> None:
    made = seal_data_key(
        BRANCH_KEY, "app", BRANCH_ID, 2, CONTEXT, DATA_KEY, bytes(range(0xC0, 0xCC))
    )
    assert made == WRAPPED and len(made) == WRAPPED_BYTES
    assert open_data_key(BRANCH_KEY, "app", 2, CONTEXT, WRAPPED) == DATA_KEY
    header = envelope.build_header("kms.bk", "app", 2, (("tenant", "acme"),), WRAPPED)
    token = envelope.seal(
        b'"123-45-6789"', AESGCM(DATA_KEY), header=header, label="$.ssn", nonce=bytes(12)
    )
    assert token == TOKEN
    env = envelope.parse(TOKEN)
    assert (env.provider, env.key_name, env.key_version, env.wrapped) == (
        "kms.bk",
        "app",
        2,
        WRAPPED,
    )
    assert envelope.decrypt_value(env, AESGCM(DATA_KEY), "$.ssn") == "123-45-6789"
    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text()
    assert TOKEN in doc and WRAPPED.hex()[58:] in doc


@pytest.mark.parametrize(
    ("key", "version", "context", "wrapped"),
    [
        ("other", 2, CONTEXT, WRAPPED),
        ("app", 3, CONTEXT, WRAPPED),
        ("app", 2, {"tenant": "evil"}, WRAPPED),
        ("app", 2, CONTEXT, b"\x02" + WRAPPED[1:]),
        ("app", 2, CONTEXT, WRAPPED[:-1]),
        ("app", 2, CONTEXT, WRAPPED[:17] + bytes([WRAPPED[17] ^ 1]) + WRAPPED[18:]),
        ("app", 2, CONTEXT, WRAPPED[:1] + bytes(16) + WRAPPED[17:]),
    ],
)
def test_refusals(key: str, version: int, context: dict[str, str], wrapped: bytes) -> None:
    with pytest.raises(CryptoError):
        open_data_key(BRANCH_KEY, key, version, context, wrapped)
