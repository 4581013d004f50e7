"""Serve the proxy's one catch-all route without aiohttp's per-request router walk.

``web.Application._handle`` resolves every request against the router, builds and freezes a
match-info object and looks for middlewares: ~8 µs of the ~45 µs aiohttp's server spends on a
request (bench/PROFILE.md, round 3). The proxy app has a single catch-all resource, so the answer
is always the same: :class:`CatchAll` asks that one resource for the match and calls the
handler directly. ``request.app``, ``request.match_info.route`` and ``on_response_prepare``
signals keep working. Anything else (a plugin that added routes or middlewares to the proxy app,
an ``Expect`` header) goes through the application as before.

This leans on two aiohttp internals, ``Application._handle`` and ``Request._match_info``; a test
pins both (tests/proxy/test_dispatch.py), so an aiohttp upgrade that changes them fails loudly.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class CatchAll:
    """A request handler for ``web.Server`` equivalent to ``app._handle`` for a one-route app."""

    def __init__(self, app: web.Application, route: web.AbstractRoute, handler: Handler) -> None:
        self._app = app
        self._route = route
        self._resource = route.resource
        self._handler = handler
        self._app_handle: Handler = app._handle

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if hdrs.EXPECT in request.headers or self._resource is None:  # 100-continue and such
            return await self._app_handle(request)
        # The match the router would give ({"tail": ...}), fresh per request so nothing a plugin
        # writes to it outlives the request. A path without escapes matches "/{tail:.*}" as it
        # is; anything else asks the resource itself (its regex and unquoting rules).
        raw = request.rel_url.raw_path
        match_info: UrlMappingMatchInfo | None
        if raw[:1] == "/" and "%" not in raw:
            match_info = UrlMappingMatchInfo({"tail": raw[1:]}, self._route)
        else:
            match_info, _ = await self._resource.resolve(request)
            if match_info is None:
                return await self._app_handle(request)
        match_info.add_app(self._app)
        match_info.freeze()
        request._match_info = match_info
        return await self._handler(request)


def install(runner: web.AppRunner, route: web.AbstractRoute, handler: Handler) -> bool:
    """Serve ``runner``'s app through :class:`CatchAll` when that is exactly equivalent.

    Call after ``runner.setup()`` and before any site starts (each connection copies the
    server's handler when it opens). Returns whether the fast path is on.
    """
    app = runner.app
    server = runner.server
    resources = list(app.router.resources())
    only_route = len(resources) == 1 and route.resource is resources[0]
    if server is None or app.middlewares or not only_route:
        log.info("proxy app has extra routes or middlewares: serving through its router")
        return False
    server.request_handler = CatchAll(app, route, handler)  # type: ignore[assignment]
    return True
