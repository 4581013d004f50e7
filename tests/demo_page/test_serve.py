"""``sidecrypt demo --browser`` as a person runs it: it prints the page's address, serves the page
and its API, and SIGTERM or Ctrl-C stops it with nothing left behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_page_is_served_and_cleaned_up_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecrypt.cli", "demo", "--browser"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        url = re.search(r"open (http://127\.0\.0\.1:\d+/)", lines[0])
        files = re.search(r"files: (\S+)", lines[3])
        assert url and files, lines
        workdir = Path(files.group(1))
        assert (workdir / "legacy.db").exists()
        with urllib.request.urlopen(url.group(1), timeout=10) as resp:
            assert b"What the app stored" in resp.read()
        with urllib.request.urlopen(url.group(1) + "api/info", timeout=10) as resp:
            assert b"$.ssn" in resp.read()
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        assert not workdir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
