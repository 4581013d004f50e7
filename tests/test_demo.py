"""``sidecrypt demo`` from a clean process: exit 0, ciphertext at rest, plaintext read back;
``--keep-running`` on free ports, cleaned up on SIGTERM; the README quick start, end to end.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from sidecrypt.demo import SAMPLES

ROOT = Path(__file__).resolve().parents[1]


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


def _read_until(proc: subprocess.Popen[str], word: str) -> str:
    assert proc.stdout is not None
    for _ in range(200):  # bounded: lines of output, not time
        line = proc.stdout.readline()
        if not line or word in line:
            return line
    return ""


def test_keep_running_takes_free_ports_and_cleans_up_on_sigterm(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecrypt.cli", "demo", "--keep-running"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    try:
        line = _read_until(proc, "sidecrypt port")
        found = re.search(r"sidecrypt port (\d+), admin port (\d+), app port (\d+)", line)
        assert found, line
        port, admin, _app = (int(p) for p in found.groups())
        assert port not in (8443, 0) and admin not in (9901, 0)  # free ones, not fixed
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=10) as r:
            assert r.status == 200
        assert list(tmpdir.iterdir())  # the keyring and certificates live there meanwhile
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, 143)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert list(tmpdir.iterdir()) == []  # keyring, certificates, database: all removed


def _quick_start() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    block = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_readme_keeps_its_first_two_lines() -> None:
    first = (ROOT / "README.md").read_text().split("```sh\n", 1)[1].splitlines()[:2]
    assert first == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/sidecrypt demo",
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest -q "
        "-p no:randomly",
    ]


def _curl(argv: list[str], cafile: Path, ports: dict[str, int]) -> tuple[int, bytes]:
    """Do what a README curl line does (headers, body, CA), on this test's free ports."""
    headers: dict[str, str] = {}
    data: bytes | None = None
    args = iter(argv[1:])
    url = ""
    for arg in args:
        if arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            data = next(args).encode()
        elif arg == "--cacert":
            next(args)
        else:
            url = arg
    for fixed, free in ports.items():
        url = url.replace(fixed, str(free))
    ctx = ssl.create_default_context(cafile=str(cafile))
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_readme_quick_start_stores_encrypted_and_reads_back(tmp_path: Path) -> None:
    steps = _quick_start()
    commands = [" ".join(s[:3]) for s in steps]
    assert ".venv/bin/sidecrypt demo --app-only" in commands
    curls = [s for s in steps if s[0] == "curl"]
    post = next(c for c in curls if "-d" in c)
    reads = [c for c in curls if "-d" not in c and "--cacert" in c]
    raw_app = next(c for c in curls if "8080" in c[-1])
    assert post and reads and raw_app
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "sidecrypt.example.yaml", tmp_path / "config")
    cli = [sys.executable, "-m", "sidecrypt.cli"]
    assert (
        subprocess.run([*cli, "certs", "dev", "certs/"], cwd=tmp_path, check=False).returncode == 0
    )
    ring = ["keys", "create", "--keyring", "config/keyring.json", "app"]
    assert subprocess.run([*cli, *ring], cwd=tmp_path, capture_output=True).returncode == 0
    app = subprocess.Popen(
        [*cli, "demo", "--app-only", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True
    )
    proxy: subprocess.Popen[str] | None = None
    try:
        found = re.search(r":(\d+)$", _read_until(app, "legacy app listening").strip())
        assert found
        app_port = int(found.group(1))
        env = {
            **os.environ,
            "SIDECRYPT_UPSTREAM_URL": f"http://127.0.0.1:{app_port}",
            "SIDECRYPT_LISTEN_ADDRESS": "127.0.0.1:0",
            "SIDECRYPT_ADMIN_ADDRESS": "127.0.0.1:0",
        }
        proxy = subprocess.Popen(
            [*cli, "run", "--config", "config/sidecrypt.example.yaml"],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proxy.stderr is not None
        for _ in range(100):
            line = proxy.stderr.readline()
            if not line or "sidecrypt listening" in line:
                break
        addresses = json.loads(line)["addresses"]
        ports = {"8443": addresses[0][1], "9901": addresses[1][1], "8080": app_port}
        ca = tmp_path / "certs" / "ca.pem"
        status, body = _curl(post, ca, ports)
        assert status == 201, body
        assert b"123-45-6789" not in body  # the app answered with what it stored
        status, stored = _curl(raw_app, ca, ports)
        assert status == 200 and b'"ssn": "sc1.' in stored.replace(b'":"', b'": "')
        assert b"123-45-6789" not in stored
        for read in reads:
            status, back = _curl(read, ca, ports)
            assert status == 200, back
            assert json.loads(back)["ssn"] == "123-45-6789"
    finally:
        for proc in (proxy, app):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
