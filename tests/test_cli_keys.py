"""``sidecrypt keys list --config``: every configured key through its provider (local, kms).

Run as users run it (a subprocess), against a real moto_server for the KMS key.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kms_server import KmsServer
from sidecrypt.keyring import create_key, rotate_key

pytestmark = pytest.mark.usefixtures("aws_env")  # moto and aws_env: tests/conftest.py


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    """The CLI as a subprocess; it inherits aws_env's dummy credentials and nothing else AWS."""
    return subprocess.run(
        [sys.executable, "-m", "sidecrypt.cli", *args], capture_output=True, timeout=60
    )


def write_config(tmp_path: Path, moto: KmsServer, **kms_keys: str) -> Path:
    ring = tmp_path / "keyring.json"
    create_key(ring, "app-kek")
    rotate_key(ring, "app-kek")
    create_key(ring, "other")
    kms = {"provider": "kms", "region": "us-east-1", "endpoint_url": moto.url}
    raw: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:8080"},
        "keys": {
            "app": {"provider": "local", "keyring": "keyring.json", "key": "app-kek"},
            **{name: {**kms, "key_id": key_id} for name, key_id in kms_keys.items()},
        },
    }
    path = tmp_path / "sidecrypt.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def key_bytes(ring: Path) -> list[bytes]:
    data = json.loads(ring.read_text())
    raw = [v["material"] for k in data["keys"].values() for v in k["versions"]]
    return [m.encode() for m in raw] + [base64.b64decode(m) for m in raw]


def test_lists_local_and_kms_keys_without_key_bytes(tmp_path: Path, moto: KmsServer) -> None:
    meta = moto.fresh_key("alias/billing")
    moto.boto3_client("kms").enable_key_rotation(KeyId=meta["KeyId"])
    path = write_config(tmp_path, moto, billing="alias/billing")
    out = run("keys", "list", "--config", str(path))
    assert out.returncode == 0, out.stderr
    listed = {k["name"]: k for k in json.loads(out.stdout)}
    assert list(listed) == ["app", "billing"]  # config order; the keyring's "other" is not listed
    app = listed["app"]
    assert (app["provider"], app["key"], app["kind"], app["primary"]) == (
        "local",
        "app-kek",
        "aes256",
        2,
    )
    assert [v["version"] for v in app["versions"]] == [1, 2]
    billing = listed["billing"]
    assert billing["provider"] == "kms" and billing["key_id"] == meta["KeyId"]
    assert billing["state"] == "Enabled" and billing["rotation_enabled"] is True
    assert billing["arn"] == meta["Arn"]
    assert all(secret not in out.stdout for secret in key_bytes(tmp_path / "keyring.json"))


def test_a_key_that_cannot_be_listed_is_an_error_entry(tmp_path: Path, moto: KmsServer) -> None:
    moto.fresh_key("alias/billing")
    path = write_config(tmp_path, moto, billing="alias/billing", ghost="alias/ghost")
    out = run("keys", "list", "-c", str(path))
    assert out.returncode == 1
    listed = {k["name"]: k for k in json.loads(out.stdout)}
    assert listed["billing"]["rotation_enabled"] is False and "error" not in listed["billing"]
    assert listed["ghost"]["provider"] == "kms" and "not found" in listed["ghost"]["error"]


def test_keyring_and_config_are_exclusive() -> None:
    out = run("keys", "list", "--keyring", "a.json", "--config", "b.yaml")
    assert out.returncode == 2 and b"not allowed with" in out.stderr
