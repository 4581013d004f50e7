"""The command line, run as users run it: the installed ``sidecrypt`` script in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIDECRYPT = [sys.executable, "-m", "sidecrypt.cli"]


def run(
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*SIDECRYPT, *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_version_and_help() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith(b"sidecrypt ")
    for verb in (
        ["run"],
        ["check-config"],
        ["demo"],
        ["certs", "dev"],
        ["keys", "create"],
        ["keys", "list"],
        ["encrypt"],
        ["audit", "verify"],
    ):
        res = run(*verb, "--help")
        assert res.returncode == 0, verb
        assert b"usage:" in res.stdout


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The example config with its certificates and keyring, laid out as the README says."""
    (tmp_path / "config").mkdir()
    shutil.copy(
        ROOT / "config" / "sidecrypt.example.yaml", tmp_path / "config" / "sidecrypt.example.yaml"
    )
    assert run("certs", "dev", str(tmp_path / "certs")).returncode == 0
    made = run("keys", "create", "--keyring", str(tmp_path / "config" / "keyring.json"), "app")
    assert made.returncode == 0, made.stderr
    return tmp_path / "config" / "sidecrypt.example.yaml"


def test_example_config_passes_check_config(example: Path) -> None:
    out = run("check-config", str(example))
    assert out.returncode == 0, out.stderr
    assert b"ok" in out.stdout


def test_bad_config_exits_2_with_dotted_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: {url: 'ftp://x'}\n")
    out = run("check-config", str(bad))
    assert out.returncode == 2
    assert f"{bad}: upstream.url: not a valid URL".encode() in out.stderr


def test_missing_keyring_is_caught_by_check_config(example: Path) -> None:
    (example.parent / "keyring.json").unlink()
    out = run("check-config", str(example))
    assert out.returncode == 2, out
    assert b"keys.app.keyring" in out.stderr  # the setting, not only the file's own path
    assert str(example.parent / "keyring.json").encode() in out.stderr


def test_keys_list_never_prints_key_bytes(tmp_path: Path) -> None:
    ring = tmp_path / "ring.json"
    assert run("keys", "create", "--keyring", str(ring), "app").returncode == 0
    assert run("keys", "rotate", "--keyring", str(ring), "app").returncode == 0
    listed = run("keys", "list", "--keyring", str(ring))
    assert listed.returncode == 0
    info = json.loads(listed.stdout)
    assert [v["version"] for v in info[0]["versions"]] == [1, 2]
    materials = [
        v["material"] for k in json.loads(ring.read_text())["keys"].values() for v in k["versions"]
    ]
    assert materials and all(m.encode() not in listed.stdout for m in materials)


def test_offline_encrypt_then_decrypt(example: Path) -> None:
    doc = {"ssn": "123-45-6789", "card": {"number": 4111}, "name": "x"}
    cfg = ("--config", str(example))
    both = (*cfg, "--field", "$.ssn", "--field", "$.card.number")
    enc = run("encrypt", *both, "--context", "tenant=acme", stdin=json.dumps(doc).encode())
    assert enc.returncode == 0, enc.stderr
    sealed = json.loads(enc.stdout)
    assert sealed["name"] == "x" and sealed["ssn"].startswith("sc1.")
    assert b"123-45-6789" not in enc.stdout
    dec = run("decrypt", *both, "--context", "tenant=acme", stdin=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    assert json.loads(dec.stdout) == doc
    wrong = run("decrypt", *cfg, "--field", "$.ssn", "--context", "tenant=other", stdin=enc.stdout)
    assert wrong.returncode == 1
    assert b"123-45-6789" not in wrong.stdout + wrong.stderr


def _wait_listening(proc: subprocess.Popen[bytes]) -> list[Any]:
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if b"sidecrypt listening" in line:
            return list(json.loads(line)["addresses"])
    raise AssertionError("sidecrypt did not start")


@contextlib.contextmanager
def sidecrypt_run(config: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``sidecrypt run`` in the background, its JSON logs on stderr, the upstream down; killed
    (and reaped) at the end whatever the test did."""
    env = {
        "SIDECRYPT_ADMIN_ADDRESS": "127.0.0.1:0",
        "SIDECRYPT_UPSTREAM_URL": "http://127.0.0.1:9",
        **env,
    }
    with subprocess.Popen(
        [*SIDECRYPT, "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    ) as proc:
        try:
            yield proc
        finally:
            proc.kill()


def test_run_serves_then_drains_on_sigterm(example: Path) -> None:
    with sidecrypt_run(example, SIDECRYPT_LISTEN_ADDRESS="127.0.0.1:0") as proc:
        addresses = _wait_listening(proc)
        admin = addresses[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{admin[1]}/healthz", timeout=5) as r:
            assert json.loads(r.read())["status"] == "ok"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{admin[1]}/readyz", timeout=5)
            raise AssertionError("readyz should be 503 with the upstream down")
        except urllib.error.HTTPError as err:
            assert err.code == 503
            assert json.loads(err.read())["checks"]["upstream"]["ok"] is False
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_two_workers_share_the_port(example: Path, tmp_path: Path) -> None:
    import ssl

    from prometheus_client.parser import text_string_to_metric_families

    port, admin = _free_port(), _free_port()
    (tmp_path / "run").mkdir()
    with sidecrypt_run(
        example,
        SIDECRYPT_LISTEN_ADDRESS=f"127.0.0.1:{port}",
        SIDECRYPT_ADMIN_ADDRESS=f"127.0.0.1:{admin}",
        SIDECRYPT_WORKERS="2",
        TMPDIR=str(tmp_path / "run"),  # where the workers' sockets go, for the check below
    ) as proc:
        assert proc.stderr is not None
        pids = set()
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if b"sidecrypt listening" in line:
                pids.add(json.loads(line)["pid"])
        assert len(pids) == 2 and proc.pid not in pids
        ctx = ssl.create_default_context(cafile=str(example.parent.parent / "certs" / "ca.pem"))
        for _ in range(10):  # the upstream is down: each worker answers 502 on its own
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"https://localhost:{port}/x", timeout=5, context=ctx)
            assert err.value.code == 502
        # /metrics on the admin listener (worker 0) counts every worker's requests.
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        up = {s.labels["worker"]: s.value for s in families["sidecrypt_worker_up"].samples}
        assert up == {"0": 1.0, "1": 1.0}
        requests = [s for s in families["sidecrypt_requests"].samples if s.name.endswith("_total")]
        assert sum(s.value for s in requests) == 10
        assert {s.labels["worker"] for s in requests} <= {"0", "1"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not any((tmp_path / "run").iterdir())  # the workers' directory is gone


def _listening_pids(proc: subprocess.Popen[bytes], count: int) -> list[int]:
    """The pids of the next ``count`` workers that log they are listening."""
    assert proc.stderr is not None
    pids: list[int] = []
    deadline = time.monotonic() + 30
    while len(pids) < count and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if b"sidecrypt listening" in line:
            pids.append(json.loads(line)["pid"])
    assert len(pids) == count, pids
    return pids


def test_a_worker_that_dies_is_replaced(example: Path) -> None:
    import ssl

    port = _free_port()
    with sidecrypt_run(
        example, SIDECRYPT_LISTEN_ADDRESS=f"127.0.0.1:{port}", SIDECRYPT_WORKERS="2"
    ) as proc:
        first = _listening_pids(proc, 2)
        time.sleep(5.5)  # past the start-up grace: a death now is a crash, not a failed start
        os.kill(first[1], signal.SIGKILL)
        (replacement,) = _listening_pids(proc, 1)
        assert replacement not in first
        ctx = ssl.create_default_context(cafile=str(example.parent.parent / "certs" / "ca.pem"))
        for _ in range(6):  # both workers answer (the upstream is down: 502)
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"https://localhost:{port}/x", timeout=5, context=ctx)
            assert err.value.code == 502
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_workers_that_cannot_start_end_the_run(example: Path) -> None:
    import socket

    with socket.socket() as taken:  # bound without SO_REUSEPORT: no worker can share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with sidecrypt_run(
            example, SIDECRYPT_LISTEN_ADDRESS=f"127.0.0.1:{port}", SIDECRYPT_WORKERS="2"
        ) as proc:
            assert proc.wait(timeout=60) == 1  # not restarted for ever
            assert proc.stderr is not None
            assert b"a worker failed at start" in proc.stderr.read()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_key_administration_is_audited(tmp_path: Path) -> None:
    ring = tmp_path / "ring.json"
    audit = tmp_path / "audit.jsonl"
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:9'}\n"
        f"audit: {{file: '{audit}', hmac_key: {{env: SC_TEST_AUDIT_KEY}}}}\n"
    )
    env = {"SC_TEST_AUDIT_KEY": "k" * 32}
    made = run("keys", "create", "--keyring", str(ring), "app", "--audit-config", str(cfg), env=env)
    assert made.returncode == 0, made.stderr
    rotated = run(
        "keys", "rotate", "--keyring", str(ring), "app", "--audit-config", str(cfg), env=env
    )
    assert rotated.returncode == 0, rotated.stderr
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    admin = [e["event"] for e in events if e["kind"] == "event"]
    assert [(e["action"], e["key_version"]) for e in admin] == [
        ("key_create", 1),
        ("key_rotate", 2),
    ]
    assert all(e["principal"].startswith("os:") for e in admin)
    verified = run("audit", "verify", "--key-env", "SC_TEST_AUDIT_KEY", str(audit), env=env)
    assert verified.returncode == 0, verified.stdout


def test_rewrap_moves_tokens_to_the_newest_version_and_to_another_key(tmp_path: Path) -> None:
    from sidecrypt import envelope

    for name in ("app", "archive"):
        assert (
            run("keys", "create", "--keyring", str(tmp_path / f"{name}.json"), name).returncode == 0
        )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:9'}\nkeys:\n"
        "  app: {provider: local, keyring: app.json}\n"
        "  archive: {provider: local, keyring: archive.json}\n"
    )
    doc = {"rows": [{"ssn": "canary-rewrap-1"}, {"ssn": 42}]}
    opts = ("--config", str(cfg), "--field", "$.rows[*].ssn")
    enc = run("encrypt", *opts, "--key", "app", "--context", "t=a", stdin=json.dumps(doc).encode())
    assert enc.returncode == 0, enc.stderr
    assert run("keys", "rotate", "--keyring", str(tmp_path / "app.json"), "app").returncode == 0

    def versions(raw: bytes) -> list[tuple[str, int]]:
        rows = json.loads(raw)["rows"]
        return [(e.key_name, e.key_version) for e in (envelope.parse(r["ssn"]) for r in rows)]

    assert versions(enc.stdout) == [("app", 1), ("app", 1)]
    rotated = run("rewrap", *opts, "--to-key", "app", stdin=enc.stdout)
    assert rotated.returncode == 0, rotated.stderr
    assert versions(rotated.stdout) == [("app", 2), ("app", 2)]
    assert json.loads(rotated.stderr.splitlines()[-1]) == {"rewrapped": 2, "from": {"app:1": 2}}
    moved = run("rewrap", *opts, "--to-key", "archive", stdin=rotated.stdout)
    assert versions(moved.stdout) == [("archive", 1), ("archive", 1)]
    assert b"canary-rewrap-1" not in rotated.stdout + moved.stdout + moved.stderr
    dec = run("decrypt", *opts, "--key", "archive", "--context", "t=a", stdin=moved.stdout)
    assert dec.returncode == 0, dec.stderr
    assert json.loads(dec.stdout) == doc
