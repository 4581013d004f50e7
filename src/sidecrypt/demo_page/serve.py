"""``sidecrypt demo`` in a browser: start the stack and the console, print the address, wait."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from ..proxy import server
from .console import create_console
from .stack import DemoStack, start_stack


@contextlib.asynccontextmanager
async def running_page(port: int = 0) -> AsyncIterator[tuple[str, DemoStack]]:
    """The console's URL and the stack behind it; everything stops (and is removed) on exit."""
    stack = await start_stack()
    runner = web.AppRunner(create_console(stack), access_log=None)
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/", stack
    finally:
        await runner.cleanup()
        await stack.close()


async def serve_page(port: int = 0, *, stop: asyncio.Event | None = None) -> None:
    async with running_page(port) as (url, stack):
        print(f"sidecrypt demo: open {url}")
        print(f"  sidecrypt (TLS, mTLS callers): https://localhost:{stack.proxy_port}")
        print(f"  admin: http://127.0.0.1:{stack.admin_port}/readyz")
        print(f"  files: {stack.workdir} (Ctrl-C removes them)", flush=True)
        await (stop or asyncio.Event()).wait()


def run_page(port: int = 0) -> int:
    """Serve until SIGINT or SIGTERM; either way every file the demo made is removed."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_page(port, stop=stop)

    server.run_loop(main())
    return 0
