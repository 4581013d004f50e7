"""A real PostgreSQL for tests: Debian's ``postgresql`` binaries, ``initdb`` + ``pg_ctl`` on a
temporary directory and a free port on 127.0.0.1.

Run as root (CI, containers), the server runs as user ``postgres`` through ``runuser``; run as
anyone else, as that user. Password authentication (scram) over TCP, so the DSN the tests hand
to sidecrypt carries a secret like a real one. ``.ci/run`` installs the package when
``/usr/lib/postgresql/*/bin/initdb`` is missing; :func:`find_bin` returns None then, and the
``postgres`` fixture in tests/conftest.py fails in CI (``CI`` set) or skips with the reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from kms_server import free_port

USER = "postgres"


def find_bin() -> Path | None:
    """The newest installed /usr/lib/postgresql/N/bin that has initdb, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One throwaway cluster: start, create databases, stop (and remove its directory)."""

    def __init__(self, bindir: Path, *, start_timeout: float = 60.0) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.start_timeout = start_timeout
        self.root = Path(tempfile.mkdtemp(prefix="sidecrypt-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self._as_root = os.geteuid() == 0
        self.started = False

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, *argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", USER, "--", *cmd]
        return subprocess.run(
            cmd,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
        )

    def start(self) -> None:
        self.sockets.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            entry = pwd.getpwnam(USER)
            for path in (self.root, self.sockets, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o700)
        os.chmod(pwfile, 0o600)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
            "-E",
            "UTF8",
        )
        pwfile.unlink()
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.sockets} -c fsync=off "
            "-c max_connections=100 -c shared_buffers=16MB"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            str(int(self.start_timeout)),
            "start",
            timeout=self.start_timeout + 10,
        )
        self.started = True
        deadline = time.monotonic() + self.start_timeout
        while True:  # pg_ctl -w waited; this makes sure TCP answers too
            try:
                self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), timeout=10)
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """A fresh database; returns its DSN (password included)."""
        self._run("createdb", "-h", str(self.sockets), "-p", str(self.port), "-U", USER, name)
        return self.dsn(name)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.started:
            self.started = False
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
