"""``sidecrypt encrypt|decrypt|rewrap`` with the ESDK format: ``--format`` overrides a key's
format, rewrap moves ``sc1.`` fields to ESDK messages and back (``--jsonl`` with progress),
and the official SDK opens what the CLI wrote with only the key."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import aws_encryption_sdk  # type: ignore[import-untyped]
from aws_encryption_sdk.identifiers import (  # type: ignore[import-untyped]
    CommitmentPolicy,
    EncryptionKeyType,
    WrappingAlgorithm,
)
from aws_encryption_sdk.key_providers.raw import (  # type: ignore[import-untyped]
    RawMasterKeyProvider,
    WrappingKey,
)

from sidecrypt import envelope, keyring
from sidecrypt.crypto.esdk import is_esdk_message

SIDECRYPT = [sys.executable, "-m", "sidecrypt.cli"]


def run(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*SIDECRYPT, *args], input=stdin, capture_output=True, timeout=60)


def test_encrypt_esdk_rewrap_both_ways(tmp_path: Path) -> None:
    ring = tmp_path / "app.json"
    keyring.create_key(ring, "app")
    material = keyring.load(ring).keys["app"].primary.material
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:9'}\nkeys:\n"
        "  app: {provider: local, keyring: app.json, esdk: {namespace: ns, name: app-key}}\n"
    )
    doc = {"ssn": "canary-cli-esdk", "n": 7}
    opts = ("--config", str(cfg), "--field", "$.ssn", "--field", "$.n")
    enc = run("encrypt", *opts, "--key", "app", "--format", "esdk", stdin=json.dumps(doc).encode())
    assert enc.returncode == 0, enc.stderr
    sealed = json.loads(enc.stdout)
    assert is_esdk_message(sealed["ssn"]) and b"canary-cli-esdk" not in enc.stdout

    class Provider(RawMasterKeyProvider):  # type: ignore[misc]
        provider_id = "ns"

        def _get_raw_key(self, key_id: bytes) -> WrappingKey:
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=material,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    sdk_keys = Provider()
    sdk_keys.add_master_key(b"app-key")
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
    )
    plain, _ = client.decrypt(source=base64.b64decode(sealed["ssn"]), key_provider=sdk_keys)
    assert json.loads(plain) == "canary-cli-esdk"

    lines = b"\n".join([enc.stdout.strip()] * 3)
    to_sc1 = run("rewrap", *opts, "--to-key", "app", "--format", "sc1", "--jsonl", stdin=lines)
    assert to_sc1.returncode == 0, to_sc1.stderr
    rows = [json.loads(line) for line in to_sc1.stdout.splitlines()]
    assert len(rows) == 3 and all(envelope.is_envelope(r["ssn"]) for r in rows)
    assert b"rewrap: 3/3 documents" in to_sc1.stderr
    assert json.loads(to_sc1.stderr.splitlines()[-1]) == {"rewrapped": 6, "from": {"app:0": 6}}

    back = run(
        "rewrap", *opts, "--to-key", "app", "--format", "esdk", "--jsonl", stdin=to_sc1.stdout
    )
    assert back.returncode == 0, back.stderr
    first = json.loads(back.stdout.splitlines()[0])
    assert is_esdk_message(first["ssn"]) and is_esdk_message(first["n"])
    dec = run("decrypt", *opts, "--key", "app", stdin=back.stdout.splitlines()[0])
    assert dec.returncode == 0, dec.stderr
    assert json.loads(dec.stdout) == doc
