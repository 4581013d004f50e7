"""The admin listener: liveness, readiness, and whatever plugins add (metrics, JWKS)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from yarl import URL

from .. import __version__, appkeys
from ..errors import SidecryptError

CHECK_TIMEOUT = 2.0

Check = Callable[[], Awaitable[Any]]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def _upstream_reachable(url: URL) -> None:
    """A TCP connect proves the app is listening without sending it a request."""
    port = url.port or (443 if url.scheme == "https" else 80)
    _, writer = await asyncio.open_connection(url.host, port)
    writer.close()
    await writer.wait_closed()


def readiness_checks(proxy_app: web.Application) -> list[tuple[str, Check]]:
    settings = proxy_app[appkeys.SETTINGS]
    keys = proxy_app[appkeys.KEYS]
    url = URL(settings.upstream.url)
    checks: list[tuple[str, Check]] = [("upstream", lambda: _upstream_reachable(url))]
    for name, provider in keys.providers.items():
        checks.append((f"key:{name}", provider.check_ready))
    for name, store in proxy_app.get(appkeys.STORES, {}).items():
        checks.append((f"store:{name}", store.check))
    for batch in proxy_app[appkeys.PLUGIN_MANAGER].hook.sidecrypt_readiness(app=proxy_app):
        checks.extend(batch)
    return checks


async def _run(name: str, check: Check) -> tuple[str, dict[str, Any]]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except SidecryptError as exc:
        return name, {"ok": False, "error": exc.message}
    except TimeoutError:
        return name, {"ok": False, "error": f"no answer within {CHECK_TIMEOUT}s"}
    except OSError as exc:
        return name, {"ok": False, "error": exc.strerror or type(exc).__name__}
    except Exception as exc:
        return name, {"ok": False, "error": type(exc).__name__}
    return name, {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 2)}


def create_admin_app(proxy_app: web.Application) -> web.Application:
    admin = web.Application()
    admin[appkeys.PROXY] = proxy_app

    async def readyz(request: web.Request) -> web.Response:
        results = dict(await asyncio.gather(*(_run(n, c) for n, c in readiness_checks(proxy_app))))
        ready = all(r["ok"] for r in results.values())
        return web.json_response(
            {"status": "ready" if ready else "unready", "checks": results},
            status=200 if ready else 503,
        )

    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    return admin
