"""Running the proxy: listeners, signals, graceful drain, and N workers on one port."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Coroutine
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import appkeys
from ..config import Settings, parse_address
from ..plugin_manager import describe_plugins, make_plugin_manager
from . import dispatch, front, send_timeout, tls
from .app import CATCH_ALL_KEY, PROXY_KEY, create_app
from .workers import MAX_SOCKET_PATH, Worker

log = logging.getLogger(__name__)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run with uvloop when it is installed (faster TLS and sockets), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


class Running:
    """Handles to a started proxy: bound addresses, and a way to stop it."""

    def __init__(self, runners: list[web.AppRunner], stop: asyncio.Event) -> None:
        self.runners = runners
        self.stop = stop

    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for runner in self.runners:
            for addr in runner.addresses:
                out.append((addr[0], addr[1]))
        return out


async def start(
    settings: Settings,
    *,
    extra_plugins: tuple[object, ...] = (),
    reuse_port: bool = False,
    admin: bool = True,
    worker: Worker | None = None,
) -> tuple[Running, Callable[[], Coroutine[Any, Any, None]]]:
    """Start listeners; returns handles and the coroutine that drains and stops them.

    ``worker``: this process's place among several; worker 0 serves the admin listener, the
    others serve their admin app on a Unix socket for worker 0 to read (proxy/workers.py).
    """
    pm = make_plugin_manager(extra_plugins)
    pm.hook.sidecrypt_check_config(settings=settings)
    log.info("plugins loaded", extra={"plugins": describe_plugins(pm)})
    server_ctx: ssl.SSLContext | None = None
    if settings.listen.tls is not None:
        server_ctx = tls.server_context(settings.listen.tls, source=settings.source)
    app = create_app(settings, pm)
    if worker is not None:
        app[appkeys.WORKER] = worker
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=settings.server.grace_period,
        keepalive_timeout=settings.server.keepalive_timeout,
        access_log=logging.getLogger("aiohttp.access") if settings.server.access_log else None,
    )
    await runner.setup()
    engine = _choose_engine(runner, settings)
    host, port = parse_address(settings.listen.address)
    site = web.TCPSite(
        runner,
        host,
        port,
        ssl_context=server_ctx,
        backlog=settings.server.backlog,
        reuse_port=reuse_port or None,
    )
    await site.start()
    runners = [runner]
    if admin and settings.admin.address:
        admin_runner = web.AppRunner(app[appkeys.ADMIN], access_log=None)
        await admin_runner.setup()
        if worker is None or worker.index == 0:
            ahost, aport = parse_address(settings.admin.address)
            await web.TCPSite(admin_runner, ahost, aport).start()
        else:
            await web.UnixSite(admin_runner, str(worker.socket(worker.index))).start()
        runners.append(admin_runner)
    stop = asyncio.Event()
    running = Running(runners, stop)
    log.info(
        "sidecrypt listening",
        extra={"addresses": running.addresses(), "pid": os.getpid(), "engine": engine},
    )

    loop = asyncio.get_running_loop()
    if server_ctx is not None and settings.listen.tls is not None:
        listen_tls = settings.listen.tls

        def reload() -> None:
            try:
                tls.reload_server_context(server_ctx, listen_tls, source=settings.source)
            except Exception as exc:  # keep serving with the old certificate
                log.error("certificate reload failed; keeping the old one", extra={"error": exc})

        _add_signal(loop, signal.SIGHUP, reload)

    async def shutdown() -> None:
        log.info("draining", extra={"grace_period": settings.server.grace_period})
        for r in reversed(runners):
            await r.cleanup()

    return running, shutdown


def _choose_engine(runner: web.AppRunner, settings: Settings) -> str:
    """The lean engine (proxy/front.py) unless the app needs what only aiohttp's server does."""
    app = runner.app
    handler = app[PROXY_KEY].handle
    catch_all = dispatch.install(runner, app[CATCH_ALL_KEY], handler)
    wanted = settings.server.engine
    if wanted == "lean":
        if catch_all and not app.on_response_prepare and not settings.server.access_log:
            front.install(runner, handler, settings)
            return "lean"
        log.info(
            "serving through aiohttp's server: the access log, or a plugin's routes, "
            "middlewares or response signals on the proxy app, need it"
        )
    send_timeout.install(runner, settings.server.send_timeout)
    return "aiohttp"


def settle_gc() -> None:
    """Move start-up objects out of the collector's sight and collect young objects less often.

    Full collections otherwise re-walk every module, config and plugin object while serving;
    per-request garbage is almost all freed by reference counting anyway.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 100)


GC_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)


def _add_signal(loop: asyncio.AbstractEventLoop, sig: int, fn: Callable[[], None]) -> None:
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals in this thread
        loop.add_signal_handler(sig, fn)


async def serve(settings: Settings, *, worker: Worker | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and drain in-flight requests."""
    running, shutdown = await start(settings, reuse_port=worker is not None, worker=worker)
    settle_gc()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        _add_signal(loop, sig, running.stop.set)
    await running.stop.wait()
    await shutdown()
    log.info("stopped")


def _worker(settings: Settings, worker: Worker) -> None:
    from .. import logs

    file = settings.audit.file
    if file is not None and file != "-":
        # One writer per chain: each worker keeps its own trail, verifiable on its own.
        audit = settings.audit.model_copy(update={"file": f"{file}.w{worker.index}"})
        settings = settings.model_copy(update={"audit": audit})
    logs.setup(settings.log.level, settings.log.format)
    run_loop(serve(settings, worker=worker))


def run(settings: Settings) -> int:
    """Run ``server.workers`` processes sharing the listening port through SO_REUSEPORT.

    The admin listener runs in worker 0; its /metrics gather every worker's.
    """
    workers = settings.server.workers
    if workers == 1:
        run_loop(serve(settings))
        return 0
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("server.workers > 1 needs SO_REUSEPORT, which this platform lacks")
        return 2
    rundir = Path(tempfile.mkdtemp(prefix="sidecrypt-"))  # mode 0700: this user's only
    try:
        if len(str(Worker(0, workers, rundir).socket(workers - 1))) > MAX_SOCKET_PATH:
            log.error("the temporary directory's path is too long for Unix sockets; set TMPDIR")
            return 2
        return _supervise(settings, [Worker(i, workers, rundir) for i in range(workers)])
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _supervise(settings: Settings, workers: list[Worker]) -> int:
    """Start the workers, restart one that dies, forward signals; the exit code.

    A worker that dies within ``STARTUP_GRACE`` of its start is not restarted (a port taken, a
    certificate unreadable: it would die again): the others are stopped and run() fails.
    """
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, tuple[BaseProcess, float]] = {}
    stopping = False

    def launch(worker: Worker) -> None:
        proc = ctx.Process(target=_worker, args=(settings, worker), daemon=False)
        proc.start()
        procs[worker.index] = (proc, time.monotonic())

    def forward_signal(sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = stopping or sig != signal.SIGHUP  # SIGHUP reloads certificates
        for proc, _ in procs.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward_signal)
    for worker in workers:
        launch(worker)
    failed = False
    while procs:
        multiprocessing.connection.wait([proc.sentinel for proc, _ in procs.values()])
        for index, (proc, started) in list(procs.items()):
            if proc.is_alive():
                continue
            proc.join()
            del procs[index]
            code = proc.exitcode
            if code in (0, -signal.SIGTERM, -signal.SIGINT):
                continue
            about = {"worker": index, "exit_code": code}
            if stopping:
                failed = True
            elif time.monotonic() - started < STARTUP_GRACE:
                log.error("a worker failed at start: stopping the others", extra=about)
                failed = True
                forward_signal(signal.SIGTERM, None)
            else:
                log.error("a worker died: starting another", extra=about)
                launch(workers[index])
    return 1 if failed else 0


STARTUP_GRACE = 5.0  # seconds in which a worker's death is a start-up failure, not a crash


__all__ = ["Running", "run", "run_loop", "serve", "start"]
