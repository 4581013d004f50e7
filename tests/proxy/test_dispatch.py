"""The catch-all fast path (proxy/dispatch.py) must serve exactly as the application would.

Real sockets and TLS through ``server.start``. ``web.Application._handle`` is wrapped (counting,
then delegating) so each test can tell whether a request took the fast path or the router.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import UrlMappingMatchInfo
from tests.conftest import Certs, RunningProxy, Upstream

from sidecrypt import hookimpl
from sidecrypt.config import Settings
from sidecrypt.envelope import is_envelope
from sidecrypt.keyring import create_key
from sidecrypt.proxy import dispatch
from sidecrypt.proxy.app import CATCH_ALL_KEY, PROXY_KEY

CANARY = "canary-dispatch-5e1b"
BIG = 300 * 1024  # above app.SMALL_BODY: the answer is streamed (prepared by the handler)


@pytest.fixture
def proxy_engine() -> str:
    return "aiohttp"  # CatchAll serves aiohttp's engine


def _config(tmp_path: Path, upstream: str, **server: Any) -> dict[str, Any]:
    create_key(tmp_path / "ring.json", "app")
    raw: dict[str, Any] = {
        "upstream": {"url": upstream},
        "keys": {"app": {"provider": "local", "keyring": str(tmp_path / "ring.json")}},
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/docs"},
                "key": "app",
                "request": {"encrypt": ["$.secret"]},
                "response": {"decrypt": ["$.secret"]},
            }
        ],
    }
    if server:
        raw["server"] = server
    return raw


async def _echo_or_big(request: web.Request, body: bytes) -> web.StreamResponse:
    if request.path == "/big":
        return web.Response(body=b"x" * BIG, content_type="application/octet-stream")
    ctype = request.content_type if body else "text/plain"
    return web.Response(body=body or b"plain", content_type=ctype)


@pytest.fixture
def app_handle_calls(monkeypatch: pytest.MonkeyPatch) -> list[web.Application]:
    """Every app whose ``_handle`` ran (patched before ``start()`` binds it), in order."""
    calls: list[web.Application] = []
    original = web.Application._handle

    async def counting(self: web.Application, request: web.Request) -> web.StreamResponse:
        calls.append(self)
        return await original(self, request)

    monkeypatch.setattr(web.Application, "_handle", counting)
    return calls


Env = tuple[RunningProxy, Upstream, aiohttp.ClientSession]
MakeEnv = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any) -> Any:
    """A proxy with the encrypting route in front of an echo upstream, and a TLS client."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=certs.client_context())
    ) as client:

        async def make(*plugins: object, **server: Any) -> Env:
            up = await upstream_factory(_echo_or_big)
            proxy = await proxy_factory(
                _config(tmp_path, up.url, **server), plugins=plugins, base_dir=tmp_path
            )
            return proxy, up, client

        yield make


def proxy_app(proxy: RunningProxy) -> web.Application:
    return proxy.running.runners[0].app


def request_handler(proxy: RunningProxy) -> object:
    server = proxy.running.runners[0].server
    assert server is not None
    return server.request_handler


def reinstall(proxy: RunningProxy) -> bool:
    """``install`` again on the live runner: it only changes anything when it answers True."""
    app = proxy_app(proxy)
    return dispatch.install(proxy.running.runners[0], app[CATCH_ALL_KEY], app[PROXY_KEY].handle)


async def roundtrip(proxy: RunningProxy, up: Upstream, client: aiohttp.ClientSession) -> None:
    """A pass-through request, then a field-encrypting one whose field reaches up as a token."""
    async with client.get(f"{proxy.url}/plain?q=1") as resp:
        assert resp.status == 200
        assert await resp.read() == b"plain"
    async with client.post(f"{proxy.url}/docs", json={"secret": CANARY, "n": 1}) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"secret": CANARY, "n": 1}
    assert [s.path_qs for s in up.seen[-2:]] == ["/plain?q=1", "/docs"]
    stored = json.loads(up.seen[-1].body)
    assert is_envelope(stored["secret"]) and stored["n"] == 1
    assert CANARY.encode() not in up.seen[-1].body


async def open_raw(proxy: RunningProxy, certs: Certs) -> tuple[Any, Any]:
    return await asyncio.open_connection(
        "127.0.0.1",
        proxy.running.addresses()[0][1],
        ssl=certs.client_context(),
        server_hostname="localhost",
    )


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """Status line, headers (lower-case names) and a Content-Length body of one answer."""
    status = await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


# -- 1. the default plugins get the fast path --------------------------------------------------


async def test_default_plugins_install_the_fast_path(
    make_env: MakeEnv, app_handle_calls: list[web.Application]
) -> None:
    proxy, up, client = await make_env()
    assert isinstance(request_handler(proxy), dispatch.CatchAll)
    await roundtrip(proxy, up, client)
    async with client.get(f"{proxy.url}/big") as resp:  # streamed: prepared by the handler
        assert resp.status == 200
        assert len(await resp.read()) == BIG
    # None of those went through the application's router.
    assert proxy_app(proxy) not in app_handle_calls


# -- 2. the aiohttp internals dispatch.py relies on ---------------------------------------------


async def test_aiohttp_internals_the_fast_path_relies_on() -> None:
    assert asyncio.iscoroutinefunction(web.Application._handle)
    assert "_match_info" in web.Request.ATTRS
    app = web.Application()

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response()

    route = app.router.add_route("*", "/{tail:.*}", handler)
    match_info = UrlMappingMatchInfo({}, route)
    match_info.add_app(app)
    match_info.freeze()
    request = make_mocked_request("GET", "/x", app=web.Application())
    request._match_info = match_info
    assert request.match_info is match_info
    assert request.app is app
    assert request.match_info.route is route and request.match_info.handler is handler
    assert request.match_info.apps == (app,)
    assert request.clone()._match_info is match_info

    # web.Server keeps the handler in a public attribute each new connection copies.
    async def low_level(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    assert web.Server(low_level).request_handler is low_level


# -- 3. plugins see the same request.app / match_info as through the router --------------------


class IdentifyRecorder:
    def __init__(self) -> None:
        self.seen: list[tuple[web.Application, web.AbstractRoute, Any, dict[str, str]]] = []

    @hookimpl(tryfirst=True)
    def sidecrypt_identify(self, request: web.Request) -> None:
        mi = request.match_info
        self.seen.append((request.app, mi.route, mi.route.handler, dict(mi)))


class NoopMiddleware:
    """Any middleware on the proxy app sends requests through the router."""

    @hookimpl
    def sidecrypt_app(self, app: web.Application, settings: Settings) -> None:
        @web.middleware
        async def noop(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await handler(request)

        app.middlewares.append(noop)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "router"])
async def test_identify_sees_the_proxy_app_and_its_route(make_env: MakeEnv, fast: bool) -> None:
    recorder = IdentifyRecorder()
    plugins: tuple[object, ...] = (recorder,) if fast else (recorder, NoopMiddleware())
    proxy, up, client = await make_env(*plugins)
    assert isinstance(request_handler(proxy), dispatch.CatchAll) is fast
    await roundtrip(proxy, up, client)
    app = proxy_app(proxy)
    assert len(recorder.seen) == 1  # identify runs on matched routes only
    seen_app, route, handler, _ = recorder.seen[0]
    assert seen_app is app
    assert route is app[CATCH_ALL_KEY]
    assert handler == app[PROXY_KEY].handle


async def test_match_info_holds_the_tail_like_the_router(make_env: MakeEnv) -> None:
    recorder = IdentifyRecorder()
    proxy, up, client = await make_env(recorder)
    assert isinstance(request_handler(proxy), dispatch.CatchAll)
    await roundtrip(proxy, up, client)
    assert recorder.seen[0][3] == {"tail": "docs"}  # what the application router hands over


class MatchInfoWriter:
    """Writes into each request's match info: nothing may carry over to the next request."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    @hookimpl
    def sidecrypt_identify(self, request: web.Request) -> None:
        self.seen.append(dict(request.match_info))
        request.match_info["written"] = "by an earlier request"


async def test_match_info_is_fresh_per_request(make_env: MakeEnv) -> None:
    writer = MatchInfoWriter()
    proxy, up, client = await make_env(writer)
    assert isinstance(request_handler(proxy), dispatch.CatchAll)
    await roundtrip(proxy, up, client)
    await roundtrip(proxy, up, client)
    assert writer.seen == [{"tail": "docs"}, {"tail": "docs"}]


# -- 4. Expect: 100-continue ----------------------------------------------------------------


async def test_expect_100_continue_on_an_encrypting_route(
    certs: Certs, make_env: MakeEnv, app_handle_calls: list[web.Application]
) -> None:
    proxy, up, _ = await make_env()
    assert isinstance(request_handler(proxy), dispatch.CatchAll)
    body = json.dumps({"secret": CANARY}).encode()
    reader, writer = await open_raw(proxy, certs)
    try:
        writer.write(
            b"POST /docs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
        )
        # The body is held back until the proxy says to go on.
        assert await asyncio.wait_for(reader.readline(), 5) == b"HTTP/1.1 100 Continue\r\n"
        assert await reader.readline() == b"\r\n"
        writer.write(body)
        status, headers, payload = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 200 "), status
    assert json.loads(payload) == {"secret": CANARY}
    assert headers["content-type"].startswith("application/json")
    assert len(up.seen) == 1
    stored = json.loads(up.seen[0].body)
    assert is_envelope(stored["secret"]) and CANARY.encode() not in up.seen[0].body
    # Expect is the application's business: it went through app._handle.
    assert app_handle_calls.count(proxy_app(proxy)) == 1


async def test_expect_100_continue_with_aiohttp_client(certs: Certs, make_env: MakeEnv) -> None:
    proxy, up, client = await make_env()
    timeout = aiohttp.ClientTimeout(total=5)  # a missing 100 Continue fails, not hangs
    async with client.post(
        f"{proxy.url}/docs", json={"secret": CANARY}, expect100=True, timeout=timeout
    ) as resp:
        assert resp.status == 200
        assert await resp.json() == {"secret": CANARY}
    assert is_envelope(json.loads(up.seen[0].body)["secret"])


# -- 5. extra routes or middlewares on the proxy app keep the router ----------------------------


class ExtraRoute:
    @hookimpl
    def sidecrypt_app(self, app: web.Application, settings: Settings) -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text=f"plugin {request.match_info['name']}")

        app.router.add_get("/plugin/{name}", hello)


async def test_plugin_route_keeps_the_router_and_is_served(make_env: MakeEnv) -> None:
    proxy, up, client = await make_env(ExtraRoute())
    assert not isinstance(request_handler(proxy), dispatch.CatchAll)
    assert reinstall(proxy) is False
    assert not isinstance(request_handler(proxy), dispatch.CatchAll)
    async with client.get(f"{proxy.url}/plugin/ada") as resp:
        assert resp.status == 200
        assert await resp.text() == "plugin ada"
    assert up.seen == []  # the plugin answered, not the upstream
    await roundtrip(proxy, up, client)


class HeaderMiddleware:
    def __init__(self) -> None:
        self.paths: list[str] = []

    @hookimpl
    def sidecrypt_app(self, app: web.Application, settings: Settings) -> None:
        @web.middleware
        async def mark(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.paths.append(request.path)
            response = await handler(request)
            if not response.prepared:
                response.headers["X-Middleware"] = "ran"
            return response

        app.middlewares.append(mark)


async def test_plugin_middleware_keeps_the_router_and_runs(make_env: MakeEnv) -> None:
    plugin = HeaderMiddleware()
    proxy, up, client = await make_env(plugin)
    assert not isinstance(request_handler(proxy), dispatch.CatchAll)
    assert reinstall(proxy) is False
    await roundtrip(proxy, up, client)
    assert plugin.paths == ["/plain", "/docs"]
    async with client.post(f"{proxy.url}/docs", json={"secret": CANARY}) as resp:
        assert resp.headers["X-Middleware"] == "ran"
        assert await resp.json() == {"secret": CANARY}


async def test_install_on_a_default_proxy_answers_true(make_env: MakeEnv) -> None:
    proxy, up, client = await make_env()
    assert reinstall(proxy) is True
    assert isinstance(request_handler(proxy), dispatch.CatchAll)
    await roundtrip(proxy, up, client)


# -- 6. on_response_prepare signals still fire --------------------------------------------------


class PrepareSignal:
    def __init__(self) -> None:
        self.apps: list[web.Application] = []

    @hookimpl
    def sidecrypt_app(self, app: web.Application, settings: Settings) -> None:
        async def stamp(request: web.Request, response: web.StreamResponse) -> None:
            self.apps.append(request.app)
            response.headers["X-Prepared"] = request.path

        app.on_response_prepare.append(stamp)


async def test_on_response_prepare_fires_on_the_fast_path(
    make_env: MakeEnv, app_handle_calls: list[web.Application]
) -> None:
    plugin = PrepareSignal()
    proxy, up, client = await make_env(plugin)
    assert isinstance(request_handler(proxy), dispatch.CatchAll)
    async with client.get(f"{proxy.url}/plain") as resp:
        assert resp.headers["X-Prepared"] == "/plain"
    async with client.post(f"{proxy.url}/docs", json={"secret": CANARY}) as resp:
        assert resp.headers["X-Prepared"] == "/docs"
        assert await resp.json() == {"secret": CANARY}
    async with client.get(f"{proxy.url}/big") as resp:  # prepared inside the handler
        assert resp.headers["X-Prepared"] == "/big"
        assert len(await resp.read()) == BIG
    assert len(plugin.apps) == 3 and all(a is proxy_app(proxy) for a in plugin.apps)
    assert proxy_app(proxy) not in app_handle_calls
    assert is_envelope(json.loads(up.seen[1].body)["secret"])


# -- 7. malformed requests ----------------------------------------------------------------------


async def test_malformed_requests_get_aiohttp_answers_and_serving_goes_on(
    certs: Certs, make_env: MakeEnv
) -> None:
    proxy, up, client = await make_env(max_header_size=2048)
    assert isinstance(request_handler(proxy), dispatch.CatchAll)
    bad = [
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/1.1 extra\r\nHost: localhost\r\n\r\n",
        b"G@T /x HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: nope\r\n\r\n",
    ]
    for raw in bad:
        reader, writer = await open_raw(proxy, certs)
        try:
            writer.write(raw)
            status, _, _ = await asyncio.wait_for(read_response(reader), 5)
        finally:
            writer.close()
        assert status.split(b" ")[1] in (b"400", b"431"), (raw[:40], status)
    assert up.seen == []
    await roundtrip(proxy, up, client)
    assert isinstance(request_handler(proxy), dispatch.CatchAll)


@pytest.mark.parametrize(
    "path",
    ["/", "/docs", "/a/b/c", "/a%20b", "/a%2Fb/c", "/%25", "/users/1?x=%2F", "/caf%C3%A9", "/a;b"],
)
async def test_match_info_equals_the_routers_for_any_path(path: str) -> None:
    app = web.Application()
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.match_info))
        return web.Response()

    route = app.router.add_route("*", "/{tail:.*}", handler)
    catch_all = dispatch.CatchAll(app, route, handler)
    await catch_all(make_mocked_request("GET", path, app=app))
    expected = await app.router.resolve(make_mocked_request("GET", path, app=app))
    assert seen == [dict(expected)]
