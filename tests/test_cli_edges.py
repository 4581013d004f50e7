"""The command line's rough edges (issue 17): usage errors, global flags, fatal errors as JSON,
a closed stdout, audit verify of several trails, the unprotected keyring note, --help texts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sidecrypt.audit_chain import Chain
from sidecrypt.cli import build_parser

SIDECRYPT = [sys.executable, "-m", "sidecrypt.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*SIDECRYPT, *args],
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("upstream: {url: 'ftp://x'}\n")
    return path


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["run", "--log-level", "loud", "--config", "x.yaml"], "--log-level"),
        (["--log-level", "loud", "check-config", "x.yaml"], "--log-level"),  # before the verb
        (["check-config", "x.yaml", "--log-format", "xml"], "--log-format"),
        (["keys", "create", "--keyring", "k.json", "--kind", "rsa1", "app"], "--kind"),
        (["encrypt", "--config", "x.yaml", "--context", "no-equals-sign"], "NAME=VALUE"),
        (["encrypt", "--config", "x.yaml", "--header", "=v"], "NAME=VALUE"),
        (["demo", "--app-only", "nowhere"], "host:port"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(argv: list[str], word: str) -> None:
    out = run(*argv)
    assert out.returncode == 2, out
    assert b"Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert word.encode() in out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["certs", "dev", "/proc/no-such-dir"],
        ["keys", "create", "--keyring", "/no/such/k.json", "a"],
    ],
)
def test_a_file_that_cannot_be_written_is_one_line(argv: list[str]) -> None:
    out = run(*argv)
    assert out.returncode == 1
    assert out.stderr.decode().startswith("sidecrypt: No such file or directory: /")
    assert len(out.stderr.strip().splitlines()) == 1 and b"Traceback" not in out.stderr


def test_global_flags_before_the_verb_apply() -> None:
    parser = build_parser()
    before = parser.parse_args(["--log-format", "text", "--log-level", "DEBUG", "run", "-c", "x"])
    assert (before.log_format, before.log_level) == ("text", "debug")
    after = parser.parse_args(["run", "-c", "x", "--log-format", "text"])
    assert after.log_format == "text"
    both = parser.parse_args(["--log-format", "json", "run", "-c", "x", "--log-format", "text"])
    assert both.log_format == "text"  # the later one, as for any repeated option
    assert not hasattr(parser.parse_args(["run", "-c", "x"]), "log_format")  # config decides


def test_a_global_log_format_reaches_the_run(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:9'}\n"
        "listen: {address: '127.0.0.1:0'}\nadmin: {address: null}\n"
    )
    proc = subprocess.Popen(
        [*SIDECRYPT, "--log-format", "text", "run", "--config", str(cfg)],
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for _ in range(50):  # bounded: the start-up lines, up to "listening"
            line = proc.stderr.readline()
            lines.append(line)
            if not line or b"sidecrypt listening" in line:
                break
        assert b"sidecrypt listening" in lines[-1], lines
        assert not any(line.startswith(b"{") for line in lines), lines  # text, not JSON
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("argv", [["--log-format", "json", "check-config"], ["run", "--config"]])
def test_fatal_errors_are_one_json_record_and_a_line(bad_config: Path, argv: list[str]) -> None:
    out = run(*argv, str(bad_config))
    assert out.returncode == 2
    lines = out.stderr.decode().strip().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) == 1, lines
    assert records[0]["level"] == "critical" and records[0]["code"] == "config_error"
    assert "upstream.url: not a valid URL" in records[0]["error"]
    assert lines[-1].startswith(f"sidecrypt: {bad_config}: upstream.url: not a valid URL")


def test_a_port_taken_is_a_fatal_error_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "s.yaml"
        cfg.write_text(
            "upstream: {url: 'http://127.0.0.1:9'}\n"
            f"listen: {{address: '127.0.0.1:{port}'}}\nadmin: {{address: null}}\n"
        )
        out = run("run", "--config", str(cfg))
    assert out.returncode == 1
    assert b"Traceback" not in out.stderr
    lines = out.stderr.decode().strip().splitlines()
    assert lines[-1] == (
        f"sidecrypt: listen.address: cannot listen on http://127.0.0.1:{port}: "
        "address already in use"
    )
    assert json.loads(lines[-2])["code"] == "listen_failed"


def test_closed_stdout_is_quiet(tmp_path: Path) -> None:
    ring = tmp_path / "ring.json"
    for i in range(40):  # enough output to need more than one write
        assert run("keys", "create", "--keyring", str(ring), f"key{i}").returncode == 0
    read, write = os.pipe()
    os.close(read)  # like `| head` that has already exited
    try:
        proc = subprocess.run(
            [*SIDECRYPT, "keys", "list", "--keyring", str(ring)],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert proc.stderr == b""
    assert proc.returncode == 1  # as the Python docs' recipe: EPIPE exits 1, quietly


def _trail(path: Path, key: bytes) -> None:
    chain = Chain(key)
    records = [
        chain.seal("chain_start", {"reason": "start", "key_id": chain.key_id}, now=1000.0),
        chain.seal("seal", {"reason": "shutdown"}, now=1001.0),
    ]
    path.write_bytes(b"".join(r.line for r in records))


def test_audit_verify_checks_each_worker_trail_on_its_own(tmp_path: Path) -> None:
    key = b"a" * 32
    env = {"SC_EDGE_AUDIT_KEY": key.decode()}
    w0, w1 = tmp_path / "audit.jsonl.w0", tmp_path / "audit.jsonl.w1"
    _trail(w0, key)
    _trail(w1, key)
    out = run("audit", "verify", "--key-env", "SC_EDGE_AUDIT_KEY", str(w0), str(w1), env=env)
    text = out.stdout.decode()
    assert out.returncode == 0, text
    assert f"{w0}: OK" in text and f"{w1}: OK" in text
    assert "each verified on its own chain" in text
    assert "replayed" not in text and "inserted" not in text
    gone = tmp_path / "audit.jsonl.w2"
    missing = run("audit", "verify", "--key-env", "SC_EDGE_AUDIT_KEY", str(w0), str(gone), env=env)
    assert missing.returncode == 1
    assert f"not found: {gone}" in missing.stdout.decode()
    assert "None" not in missing.stdout.decode()


def test_an_unprotected_keyring_is_pointed_out(tmp_path: Path) -> None:
    ring = tmp_path / "keyring.json"
    made = run("keys", "create", "--keyring", str(ring), "app")
    assert made.returncode == 0
    assert b"not protected at rest" in made.stderr
    assert b"--master-key-env" in made.stderr and b"docs/operations.md" in made.stderr
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:9'}\n"
        "keys: {app: {provider: local, keyring: keyring.json}}\n"
    )
    checked = run("check-config", "--offline", str(cfg))
    assert checked.returncode == 0, checked.stderr
    assert b"note: keys.app: the local keyring is not protected at rest" in checked.stdout
    protected = run(
        "keys",
        "create",
        "--keyring",
        str(tmp_path / "p.json"),
        "--master-key-env",
        "SC_EDGE_MASTER",
        "app",
        env={"SC_EDGE_MASTER": "m" * 44},
    )
    assert protected.returncode == 0 and b"not protected" not in protected.stderr


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                out.extend(_parsers(child))
    return out


def test_every_argument_has_help_and_the_description_has_no_backquotes() -> None:
    parser = build_parser()
    missing = [
        f"{p.prog}: {a.dest}"
        for p in _parsers(parser)
        for a in p._actions
        if not a.help and not isinstance(a, argparse._HelpAction)
    ]
    assert missing == []
    assert "`" not in parser.format_help()
