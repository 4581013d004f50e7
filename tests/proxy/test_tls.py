"""TLS on the listener: versions, mTLS, identity reaching plugins, reload; verified upstream TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from tests.conftest import Certs

from sidecrypt import appkeys, hookimpl
from sidecrypt.errors import ConfigError
from sidecrypt.identity import Principal


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    version = writer.get_extra_info("ssl_object").version()
    writer.close()
    return str(version)


async def test_tls13_works_and_tls11_is_refused(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory({"upstream": {"url": upstream.url}})
    assert await _handshake(_port(proxy.url), certs.client_context()) == "TLSv1.3"

    old = certs.client_context()
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1  # deprecated on purpose
    with contextlib.suppress(ssl.SSLError):
        old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(_port(proxy.url), old)


async def test_tls12_offers_only_intermediate_ciphers(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory({"upstream": {"url": upstream.url}})
    ctx = certs.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES256-SHA:AES128-SHA")  # no forward secrecy: must be refused
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(_port(proxy.url), ctx)
    ok = certs.client_context()
    ok.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await _handshake(_port(proxy.url), ok) == "TLSv1.2"


class SeeIdentity:
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    @hookimpl
    def sidecrypt_identify(self, request: web.Request) -> Principal | None:
        cert = request.get(appkeys.PEER_CERT)
        self.seen.append(cert.common_name if cert else None)
        return None

    @hookimpl
    def sidecrypt_authorize(
        self, principal: Any, action: str, route: str, field: str
    ) -> str | None:
        return None


async def test_mtls_requires_a_certificate_from_the_configured_ca(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    plugin = SeeIdentity()
    proxy = await proxy_factory(
        {
            "upstream": {"url": upstream.url},
            "listen": {
                "tls": {
                    "cert": str(certs.server_cert),
                    "key": str(certs.server_key),
                    "client_ca": str(certs.ca_file),
                }
            },
            "routes": [{"match": {"path": "/who"}}],
        },
        plugins=(plugin,),
    )
    port = _port(proxy.url)

    async def get(ctx: ssl.SSLContext) -> int:
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/who", ssl=ctx) as r:
            return r.status

    with pytest.raises(aiohttp.ClientError):
        await get(certs.client_context())  # no certificate
    stranger = trustme.CA().issue_cert("intruder.test", common_name="intruder")
    with pytest.raises(aiohttp.ClientError):
        await get(certs.client_context(client=stranger))  # another CA
    good = certs.issue_client("alice")
    assert await get(certs.client_context(client=good)) == 200
    assert plugin.seen == ["alice"]
    assert len(upstream.seen) == 1
    del port


async def test_missing_certificate_fails_at_startup(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    with pytest.raises(ConfigError) as err:
        await proxy_factory(
            {
                "upstream": {"url": upstream.url},
                "listen": {"tls": {"cert": "nope.pem", "key": str(certs.server_key)}},
            }
        )
    assert "listen.tls.cert" in str(err.value)
    assert "nope.pem" in str(err.value)


async def test_upstream_https_is_verified(
    certs: Certs, proxy_factory: Any, aiohttp_server: Any
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="secure hello")

    app = web.Application()
    app.router.add_get("/", hello)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certs.ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    srv = await aiohttp_server(app, host="127.0.0.1", ssl=server_ctx)
    url = f"https://localhost:{srv.port}"

    trusting = await proxy_factory({"upstream": {"url": url, "ca": str(certs.ca_file)}})
    untrusting = await proxy_factory({"upstream": {"url": url}})  # system store: unknown CA
    async with aiohttp.ClientSession() as s:
        async with s.get(trusting.url + "/", ssl=certs.client_context()) as r:
            assert r.status == 200
            assert await r.text() == "secure hello"
        async with s.get(untrusting.url + "/", ssl=certs.client_context()) as r:
            assert r.status == 502
            assert "certificate" in (await r.json())["error"]["message"].lower()
