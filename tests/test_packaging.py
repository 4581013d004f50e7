"""Packaging: the license as a PEP 639 expression with its file, and what a runtime install
pulls in (no test libraries)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project() -> dict[str, object]:
    meta: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return meta


def test_license_is_an_spdx_expression_with_its_file() -> None:
    """The table form (license = {text = ...}) is rejected by setuptools from 2027-02-18."""
    meta = project()
    assert meta["license"] == "Apache-2.0"
    assert meta["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert any(r.startswith("setuptools>=77") for r in build["requires"])  # PEP 639 support


def test_runtime_install_needs_no_test_library() -> None:
    """trustme, pytest and friends are test extras: dev certificates come from cryptography."""
    runtime = " ".join(project()["dependencies"]).lower()  # type: ignore[arg-type]
    for test_only in ("trustme", "pytest", "hypothesis", "moto"):
        assert test_only not in runtime, test_only
    assert "trustme" not in (ROOT / "src" / "sidecrypt" / "certs.py").read_text()
