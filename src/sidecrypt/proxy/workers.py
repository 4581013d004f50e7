"""``server.workers: N``: N processes on one port (SO_REUSEPORT), supervised by the first.

The master starts the workers, forwards SIGTERM, SIGINT and SIGHUP to them, and replaces a
worker that dies (after a pause that doubles while it keeps dying young); one that dies within
``STARTUP_GRACE`` of its start would die again (a port taken, a file unreadable), so the run
stops with exit code 1 instead. Workers die with the master (PR_SET_PDEATHSIG on Linux).

The admin listener runs in worker 0. Workers 1..N-1 serve their admin app on a Unix socket in a
directory only this user can enter, so that worker 0 can answer ``/metrics`` for all of them
(plugins/metrics_workers.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

# sun_path holds 108 bytes on Linux (104 on macOS): a longer TMPDIR cannot hold the sockets.
MAX_SOCKET_PATH = 100
STARTUP_GRACE = 5.0  # seconds in which a worker's death is a failed start, not a crash
STABLE = 60.0  # a worker that ran this long is restarted at once when it dies
MAX_BACKOFF = 30.0
SUPERVISED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class Worker:
    index: int
    count: int
    rundir: Path  # made by the master process with mode 0700, removed when it exits

    def socket(self, index: int) -> Path:
        return self.rundir / f"w{index}.sock"

    def peers(self) -> list[int]:
        """The other workers, as worker 0 asks them."""
        return [i for i in range(self.count) if i != self.index]


def run(settings: Settings) -> int:
    """The master: make the socket directory, supervise the workers, remove it; the exit code."""
    count = settings.server.workers
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("server.workers > 1 needs SO_REUSEPORT, which this platform lacks")
        return 2
    rundir = Path(tempfile.mkdtemp(prefix="sidecrypt-"))  # mode 0700: this user's only
    try:
        if len(str(Worker(0, count, rundir).socket(count - 1))) > MAX_SOCKET_PATH:
            log.error("the temporary directory's path is too long for Unix sockets; set TMPDIR")
            return 2
        return _supervise(settings, [Worker(i, count, rundir) for i in range(count)])
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _supervise(settings: Settings, workers: list[Worker]) -> int:
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, tuple[BaseProcess, float]] = {}
    due: dict[int, float] = {}  # workers to start again, and when
    young_deaths: dict[int, int] = {}
    stopping = False
    failed = False

    def launch(worker: Worker) -> None:
        proc = ctx.Process(target=_run_worker, args=(settings, worker, os.getpid()))
        # Signals wait until the new worker is in `procs`: one forwarded before would miss it
        # (and the worker starts with them blocked until it can take them: _run_worker).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISED)
        try:
            proc.start()
            procs[worker.index] = (proc, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if stopping and proc.pid is not None:  # taken by another thread meanwhile
            os.kill(proc.pid, signal.SIGTERM)

    def forward_signal(sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = stopping or sig != signal.SIGHUP  # SIGHUP reloads certificates
        for proc, _ in procs.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, sig)

    for sig in SUPERVISED:
        signal.signal(sig, forward_signal)
    with _wakeup_pipe() as wake:
        for worker in workers:
            launch(worker)
        while procs or (due and not stopping):
            timeout = max(0.0, min(due.values()) - time.monotonic()) if due else None
            sentinels = [proc.sentinel for proc, _ in procs.values()]
            if wake in multiprocessing.connection.wait([*sentinels, wake], timeout):
                with contextlib.suppress(BlockingIOError):
                    os.read(wake, 4096)
            now = time.monotonic()
            for index, when in list(due.items()):
                if stopping or when <= now:
                    del due[index]
                    if not stopping:
                        launch(workers[index])
            for index, (proc, started) in list(procs.items()):
                if proc.is_alive():
                    continue
                proc.join()
                del procs[index]
                code = proc.exitcode
                if code in (0, -signal.SIGTERM, -signal.SIGINT):
                    continue
                about: dict[str, Any] = {"worker": index, "exit_code": code}
                if stopping:
                    failed = True
                elif now - started < STARTUP_GRACE:
                    log.error("a worker failed at start: stopping the others", extra=about)
                    failed = True
                    forward_signal(signal.SIGTERM, None)
                else:
                    young = now - started < STABLE
                    young_deaths[index] = young_deaths.get(index, 0) + 1 if young else 0
                    pause = min(MAX_BACKOFF, 2.0 ** (young_deaths[index] - 1)) if young else 0.0
                    log.error(
                        "a worker died: starting another", extra={**about, "in_seconds": pause}
                    )
                    due[index] = now + pause
    return 1 if failed else 0


@contextlib.contextmanager
def _wakeup_pipe() -> Iterator[int]:
    """A pipe that every signal writes to (signal.set_wakeup_fd): its read end, for wait().

    Python runs handlers in the main thread only; a signal the kernel gives to another thread
    while this one sleeps in wait() would otherwise stay pending until a worker exits.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield read_fd
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)


def _run_worker(settings: Settings, worker: Worker, master: int) -> None:
    """A worker process: tied to the master's life, then signals taken, then served."""
    _die_with_parent(master)
    # Started with SUPERVISED blocked (launch), and with the master's handlers if forked: from
    # here SIGHUP is ignored until serve() can reload, and a pending SIGTERM or SIGINT ends the
    # worker as a stop does.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISED)
        _worker(settings, worker)
    except KeyboardInterrupt:
        pass


def _worker(settings: Settings, worker: Worker) -> None:
    from .. import logs
    from .server import run_loop, serve

    file = settings.audit.file
    if file is not None and file != "-":
        # One writer per chain: each worker keeps its own trail, verifiable on its own.
        audit = settings.audit.model_copy(update={"file": f"{file}.w{worker.index}"})
        settings = settings.model_copy(update={"audit": audit})
    logs.setup(settings.log.level, settings.log.format)
    run_loop(serve(settings, worker=worker))


PR_SET_PDEATHSIG = 1


def _die_with_parent(master: int) -> None:
    """SIGTERM when the master dies, even by SIGKILL (Linux); elsewhere, nothing to do."""
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc on Linux
    if not hasattr(libc, "prctl") or libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return
    if os.getppid() != master:  # the master died before the tie was made
        os.kill(os.getpid(), signal.SIGTERM)
