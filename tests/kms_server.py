"""A real KMS-compatible endpoint for tests: ``moto_server`` as a subprocess on 127.0.0.1.

The server keeps its port across :meth:`KmsServer.restart`, so a client created before an
outage reconnects to the same ``url`` afterwards. moto keeps state in memory only: a restart
(or :meth:`reset`) forgets every key, so tests re-create what they need.

Use it directly (``with KmsServer() as kms: ...``) or through the ``moto`` fixture (one server per
test module) with ``aws_env`` (dummy credentials), both in tests/conftest.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

REGION = "us-east-1"
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _moto_server_command() -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "moto.server"]


class KmsServer:
    """One moto_server process: start, wait until it answers, reset, stop, pause, restart."""

    def __init__(self, port: int | None = None, *, start_timeout: float = 30.0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> KmsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        env = {**os.environ, **DUMMY_ENV}
        self.proc = subprocess.Popen(
            [*_moto_server_command(), "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.url} in {self.start_timeout}s")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Kill the server (SIGKILL: an outage, not a graceful shutdown)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start again on the same port; all keys are gone afterwards."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the process: connections are accepted by the kernel but never answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def reset(self) -> None:
        """Forget every resource (``POST /moto-api/reset``)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def boto3_client(self, service: str) -> Any:
        """A plain (sync) boto3 client for test set-up: create keys, aliases, roles."""
        import boto3  # type: ignore[import-untyped]

        return boto3.client(
            service,
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def fresh_key(self, alias: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Start again if a test stopped the server, forget every key, create one (KeyMetadata)."""
        if not self.running:
            self.start()
        self.reset()
        return self.create_key(alias, **kwargs)

    def create_key(self, alias: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Create a KMS key (symmetric by default) and optionally an alias; returns KeyMetadata."""
        kms = self.boto3_client("kms")
        meta: dict[str, Any] = kms.create_key(**kwargs)["KeyMetadata"]
        if alias is not None:
            kms.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
        return meta
