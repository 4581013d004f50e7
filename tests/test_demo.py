"""``sidecrypt demo`` from a clean process: exit 0, ciphertext at rest, plaintext read back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sidecrypt.demo import SAMPLES


def test_demo_shows_ciphertext_at_rest_and_plaintext_read_back(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecrypt.cli", "demo"],
        cwd=tmp_path,  # no config, keyring or certs needed from the working directory
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    sections = out.split("--- ")
    stored = [s for s in sections if s.startswith("2. legacy app stored")]
    sent = [s for s in sections if s.startswith("1. client sent")]
    read = [s for s in sections if s.startswith("3. client reads back")]
    assert len(stored) == len(sent) == len(read) == len(SAMPLES)
    for sample, at_rest, back in zip(SAMPLES, stored, read, strict=True):
        # The stored column shows tokens where the configured fields were, never the values.
        # (indented as JSON: long lines are cut, not re-wrapped, so the token start stays visible)
        assert '\n  "ssn": "sc1.A' in at_rest
        assert '\n    "number": "sc1.A' in at_rest
        assert str(sample["ssn"]) not in at_rest
        assert sample["card"]["number"] not in at_rest
        assert sample["name"] in at_rest  # unconfigured fields are stored as sent
        assert str(sample["ssn"]) in back and sample["card"]["number"] in back
        assert "sc1." not in back
        # The tokenized email: a valid address of the same length at rest, the value read back.
        token = at_rest.split('"email": "', 1)[1].split('"', 1)[0]
        assert token != sample["email"] and len(token) == len(sample["email"])
        assert token.endswith("@example.org") and sample["email"] in back
    assert out.count("round trip identical") == len(SAMPLES)
    assert "=== lookup found the record ===" in out  # GET /users?email=... through sidecrypt
    assert "DIFFERS" not in out
    # Nothing secret in the log lines either.
    assert "123-45-6789" not in proc.stderr
