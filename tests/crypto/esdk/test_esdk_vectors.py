"""The public AWS Encryption SDK decrypt vectors (raw AES subset) and commitment KATs.

The vectors live in tests/data/aws-esdk-raw-aes (1.1 MB, copied from the shared vector set; its
README says where they come from), so the suite does not depend on a folder beside the checkout.
Valid messages must decrypt to the manifest's plaintext; the ESDK-.NET 4.0.0 "invalid" set
(bad header auth with a required encryption context) and the "Invalid commitment" KATs must be
refused with the one opaque error.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecrypt.crypto.esdk import EsdkError
from sidecrypt.crypto.esdk.derive import derive
from sidecrypt.crypto.esdk.message import decrypt_message, parse_message
from sidecrypt.crypto.esdk.raw_aes import RawAesKeyring

ROOT = Path(__file__).parents[2] / "data" / "aws-esdk-raw-aes"
SETS = {"valid-Net-4.0.0": 5, "v4-Net-4.0.1": 33, "invalid-Net-4.0.0": 28}


def _cases() -> list[Any]:
    out = []
    for name in SETS:
        manifest = json.loads((ROOT / name / "manifest.json").read_text())
        keys = json.loads((ROOT / name / "keys.json").read_text())["keys"]
        for test_id, test in manifest["tests"].items():
            out.append(pytest.param(name, test, keys, id=f"{name}/{test_id[:40]}"))
    return out


def _file(name: str, uri: str) -> bytes:
    assert uri.startswith("file://")
    return (ROOT / name / uri[len("file://") :]).read_bytes()


def test_vector_counts() -> None:
    for name, count in SETS.items():
        assert len(json.loads((ROOT / name / "manifest.json").read_text())["tests"]) == count


@pytest.mark.parametrize(("name", "test", "keys"), _cases())
def test_decrypt_vector(name: str, test: dict[str, Any], keys: dict[str, Any]) -> None:
    (master,) = test["master-keys"]
    key = keys[master["key"]]
    ring = RawAesKeyring(
        master["provider-id"], key["key-id"], [AESGCM(base64.b64decode(key["material"]))]
    )
    data = _file(name, test["ciphertext"])
    reproduced = test.get("encryption-context")
    if name.startswith("invalid"):
        with pytest.raises(EsdkError):
            decrypt_message(data, ring.unwrap, reproduced=reproduced)
        return
    result = decrypt_message(data, ring.unwrap, reproduced=reproduced)
    assert result.plaintext == _file(name, test["result"]["output"]["plaintext"])
    assert result.suite.id == int(_test_suite(test), 16)


def _test_suite(test: dict[str, Any]) -> str:
    return str(test["ciphertext"]).rsplit("/", 1)[1][:4]


KATS = json.loads((ROOT / "commitment-test-vectors.json").read_text())["tests"]


@pytest.mark.parametrize("kat", KATS, ids=[str(i) for i in range(len(KATS))])
def test_commitment_kat(kat: dict[str, Any]) -> None:
    """A static keyring returns the KAT's data key: derivation and commitment are checked."""
    dek = base64.b64decode(kat["decrypted-dek"])
    data = base64.b64decode(kat["ciphertext"])
    if not kat["status"]:
        with pytest.raises(EsdkError):
            decrypt_message(data, lambda suite, edks, ctx: dek)
        return
    result = decrypt_message(data, lambda suite, edks, ctx: dek)
    assert result.plaintext == "".join(kat["plaintext-frames"]).encode()
    assert result.context == kat["encryption-context"]
    header = parse_message(data)
    key, commitment = derive(header.suite, dek, header.message_id)
    assert commitment == base64.b64decode(kat["commitment"])
    if "content-encryption-key" in kat:
        assert key == base64.b64decode(kat["content-encryption-key"])


def test_kat_counts() -> None:
    assert len(KATS) == 46
    assert sum(not k["status"] for k in KATS) == 5
