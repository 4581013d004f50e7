"""Built-in audit sinks: a JSON-lines file (rotated, one writer per file) and standard output.

Sinks get sealed records (:class:`~sidecrypt.audit_chain.Record`) from the audit plugin's
background writer; blocking file I/O runs in a thread so the event loop never waits on a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .audit_chain import Record, last_record
from .errors import AuditError

log = logging.getLogger(__name__)


class FileSink:
    """JSON lines appended to a file, rotated to FILE.1 (newest) ... beyond ``max_bytes``."""

    def __init__(
        self, path: Path, *, max_bytes: int | None = None, keep: int = 0, fsync: bool = False
    ) -> None:
        self.path = path
        self.name = f"file:{path}"
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self._fd: int | None = None
        self._lock: int | None = None
        self._size = 0

    async def open(self) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._open)

    def _open(self) -> dict[str, Any] | None:
        self._take_lock()
        try:
            last = last_record(self.path)
        except ValueError as exc:
            raise AuditError(
                f"audit file {self.path}: {exc}; verify it and move it aside"
            ) from None
        except OSError as exc:
            raise AuditError(f"cannot read audit file {self.path}: {exc.strerror}") from None
        self._reopen()
        return last

    def _take_lock(self) -> None:
        """One writer per file: two would interleave two chains and break both."""
        lock_path = f"{self.path}.lock"
        try:
            fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise AuditError(
                f"audit file {self.path} is in use by another process (one writer per file: "
                "give each worker or tool its own audit.file)"
            ) from None
        self._lock = fd

    def _reopen(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit file {self.path}: {exc.strerror}") from None
        self._size = os.fstat(self._fd).st_size

    async def write(self, records: Sequence[Record]) -> None:
        data = b"".join(r.line for r in records)
        sync = self.fsync and any(r.kind != "event" for r in records)
        await asyncio.to_thread(self._write, data, sync)

    def _write(self, data: bytes, sync: bool) -> None:
        if self._fd is None:
            self._reopen()
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            if sync:
                os.fsync(self._fd)
        except OSError:
            # Leave no partial line: the same records are retried in full.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

    def wants_rotation(self) -> bool:
        return self.max_bytes is not None and self._size >= self.max_bytes

    async def rotate(self) -> None:
        await asyncio.to_thread(self._rotate)

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            n = 1
            while Path(f"{self.path}.{n}").exists():
                n += 1
            for i in range(n - 1, 0, -1):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
            if self.keep:
                for i in range(self.keep + 1, n + 1):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self.path}.{i}")
        except OSError as exc:  # keep writing to the same file; the chain is unaffected
            log.error("audit file rotation failed: %s", exc.strerror)
        self._reopen()

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None


class StdoutSink:
    """JSON lines on standard output (``audit.file: "-"``), for container log collectors."""

    name = "stdout"

    async def write(self, records: Sequence[Record]) -> None:
        data = b"".join(r.line for r in records)
        await asyncio.to_thread(self._write, data)

    @staticmethod
    def _write(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    async def close(self) -> None:
        return None
