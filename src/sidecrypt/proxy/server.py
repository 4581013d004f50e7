"""Running the proxy: listeners, signals, graceful drain, and N workers on one port."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from .. import appkeys
from ..config import Settings, parse_address
from ..errors import SidecryptError
from ..plugin_manager import describe_plugins, make_plugin_manager
from . import dispatch, front, send_timeout, tls, tls_reload, workers
from .app import CATCH_ALL_KEY, PROXY_KEY, create_app
from .workers import Worker

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
    reloads = tls_reload.Reloads()
    if (listen_tls := settings.listen.tls) is not None:
        live = tls_reload.listener(
            lambda: tls.server_context(listen_tls, source=settings.source),
            [f for f in (listen_tls.cert, listen_tls.key, listen_tls.client_ca) if f is not None],
        )
        reloads.add(live)
        server_ctx = live.current
    app = create_app(settings, pm)
    app[appkeys.TLS_RELOADS] = reloads
    if worker is not None:
        app[appkeys.WORKER] = worker
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=settings.server.grace_period,
        keepalive_timeout=settings.server.keepalive_timeout,
        access_log=None,  # server.access_log: plugins/access_log.py, on either engine
    )
    await runner.setup()
    pool = app[PROXY_KEY].pool
    reloads.add(pool.tls if pool is not None else None)
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
    runners = [runner]
    try:
        await _listen(site, "listen.address")
        if admin and settings.admin.address:
            admin_runner = web.AppRunner(app[appkeys.ADMIN], access_log=None)
            await admin_runner.setup()
            runners.append(admin_runner)
            if worker is None or worker.index == 0:
                ahost, aport = parse_address(settings.admin.address)
                await _listen(web.TCPSite(admin_runner, ahost, aport), "admin.address")
            else:
                await web.UnixSite(admin_runner, str(worker.socket(worker.index))).start()
    except BaseException:
        for r in reversed(runners):
            await r.cleanup()
        raise
    stop = asyncio.Event()
    running = Running(runners, stop)
    log.info(
        "sidecrypt listening",
        extra={"addresses": running.addresses(), "pid": os.getpid(), "engine": engine},
    )

    loop = asyncio.get_running_loop()
    # SIGHUP's default action would end the process: a reload must never do that.
    if reloads.contexts:
        _add_signal(loop, signal.SIGHUP, reloads.reload_all)
    else:
        _add_signal(loop, signal.SIGHUP, lambda: log.info("SIGHUP: no certificate to reload"))
    watcher = reloads.start(settings.server.tls_reload_interval)

    async def shutdown() -> None:
        await tls_reload.stop(watcher)
        log.info("draining", extra={"grace_period": settings.server.grace_period})
        for r in reversed(runners):
            await r.cleanup()

    return running, shutdown


async def _listen(site: web.BaseSite, setting: str) -> None:
    """Start a site; a port taken or an address not ours is a one-line error naming the setting."""
    try:
        await site.start()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if "address already in use" in str(exc).lower():
            reason = "address already in use"
        raise SidecryptError(
            f"{setting}: cannot listen on {site.name}: {reason}", code="listen_failed"
        ) from None


def _choose_engine(runner: web.AppRunner, settings: Settings) -> str:
    """The lean engine (proxy/front.py) unless the app needs what only aiohttp's server does."""
    app = runner.app
    handler = app[PROXY_KEY].handle
    catch_all = dispatch.install(runner, app[CATCH_ALL_KEY], handler)
    wanted = settings.server.engine
    if wanted == "lean":
        if catch_all and not app.on_response_prepare:
            front.install(runner, handler, settings)
            return "lean"
        log.info(
            "serving through aiohttp's server: a plugin's routes, middlewares or response "
            "signals on the proxy app need it"
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


def run(settings: Settings) -> int:
    """Run ``server.workers`` processes sharing the listening port (proxy/workers.py)."""
    if settings.server.workers == 1:
        run_loop(serve(settings))
        return 0
    return workers.run(settings)


__all__ = ["Running", "run", "run_loop", "serve", "start"]
