"""TLS reload by replacement (proxy/tls_reload.py): a CA removed from a file stops being trusted.

The listener's client CA (the issue's table), the upstream's CA, and a broken file that keeps the
previous context; reloads come from the file poll here and from a real SIGHUP in test_lifecycle.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from tests.conftest import Certs

from sidecrypt import appkeys
from sidecrypt.proxy.tls_reload import Reloads


def _reloads(proxy: Any) -> Reloads:
    return proxy.running.runners[0].app[appkeys.TLS_RELOADS]  # type: ignore[no-any-return]


async def _wait_reloaded(
    reloads: Reloads, name: str, *, successes: int = 0, failures: int = 0
) -> None:
    live = next(c for c in reloads.contexts if c.name == name)
    for _ in range(400):  # bounded: 20 s
        if live.successes >= successes and live.failures >= failures:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no reload of {name}: {live.successes} ok, {live.failures} failed")


async def _status(url: str, ctx: ssl.SSLContext) -> int | str:
    try:
        async with aiohttp.ClientSession() as s, s.get(url + "/r", ssl=ctx) as r:
            return r.status
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        return "refused"


@pytest.fixture
def two_cas(tmp_path: Path) -> tuple[trustme.CA, trustme.CA, Path]:
    ca_a, ca_b = trustme.CA(), trustme.CA()
    bundle = tmp_path / "client-ca.pem"
    ca_a.cert_pem.write_to_path(str(bundle))
    return ca_a, ca_b, bundle


async def _mtls_proxy(proxy_factory: Any, certs: Certs, upstream: Any, bundle: Path) -> Any:
    return await proxy_factory(
        {
            "upstream": {"url": upstream.url},
            "listen": {
                "tls": {
                    "cert": str(certs.server_cert),
                    "key": str(certs.server_key),
                    "client_ca": str(bundle),
                }
            },
            "server": {"tls_reload_interval": 0.05},
        }
    )


async def test_client_ca_replaced_on_disk_revokes_the_old_ca(
    certs: Certs, upstream: Any, proxy_factory: Any, two_cas: Any
) -> None:
    ca_a, ca_b, bundle = two_cas
    proxy = await _mtls_proxy(proxy_factory, certs, upstream, bundle)
    from_a = certs.client_context(client=ca_a.issue_cert("a.test", common_name="a"))
    from_b = certs.client_context(client=ca_b.issue_cert("b.test", common_name="b"))
    no_sni = certs.client_context(client=ca_a.issue_cert("a2.test", common_name="a2"))
    no_sni_url = proxy.url.replace("localhost", "127.0.0.1")  # an IP: no SNI is sent
    assert (await _status(proxy.url, from_a), await _status(proxy.url, from_b)) == (200, "refused")

    async with aiohttp.ClientSession() as kept:  # established before the reload: it finishes
        async with kept.get(proxy.url + "/kept", ssl=from_a) as r:
            assert r.status == 200
        ca_b.cert_pem.write_to_path(str(bundle))  # no signal: the poll sees the new content
        await _wait_reloaded(_reloads(proxy), "listen", successes=1)
        async with kept.get(proxy.url + "/kept", ssl=from_a) as r:
            assert r.status == 200

    assert (await _status(proxy.url, from_a), await _status(proxy.url, from_b)) == ("refused", 200)
    assert await _status(no_sni_url, no_sni) == "refused"
    assert proxy.admin_url is not None
    async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'sidecrypt_tls_reload_total{context="listen",result="success"} 1.0' in text
    assert "sidecrypt_tls_reload_last_success_timestamp_seconds" in text


async def test_a_broken_file_keeps_the_previous_context(
    certs: Certs,
    upstream: Any,
    proxy_factory: Any,
    two_cas: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca_a, ca_b, bundle = two_cas
    proxy = await _mtls_proxy(proxy_factory, certs, upstream, bundle)
    from_a = certs.client_context(client=ca_a.issue_cert("a.test", common_name="a"))
    reloads = _reloads(proxy)
    canary = "-----BEGIN CERTIFICATE-----\nQ0FOQVJZLXNlY3JldA==\n-----END CERTIFICATE-----\n"
    with caplog.at_level(logging.ERROR, "sidecrypt.proxy.tls_reload"):
        bundle.write_text(canary)
        await _wait_reloaded(reloads, "listen", failures=1)
        assert await _status(proxy.url, from_a) == 200  # still CA-A's context
        reloads.reload_all()  # what SIGHUP runs: fails again, keeps CA-A
        assert await _status(proxy.url, from_a) == 200
    live = reloads.contexts[0]
    assert (live.successes, live.failures) == (0, 2)
    messages = " ".join(f"{r.getMessage()} {r.__dict__.get('error')}" for r in caplog.records)
    assert "keeping the previous context" in messages
    assert "listen.tls.client_ca" in messages
    assert "Q0FOQVJZ" not in messages
    # A fixed file is picked up by the next poll.
    ca_b.cert_pem.write_to_path(str(bundle))
    await _wait_reloaded(reloads, "listen", successes=1)
    assert await _status(proxy.url, from_a) == "refused"


async def test_a_ca_removed_from_upstream_ca_is_no_longer_trusted(
    certs: Certs, proxy_factory: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="secure hello")

    app = web.Application()
    app.router.add_get("/r", hello)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certs.ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    srv = await aiohttp_server(app, host="127.0.0.1", ssl=server_ctx)
    trusted = tmp_path / "upstream-ca.pem"
    certs.ca.cert_pem.write_to_path(str(trusted))
    proxy = await proxy_factory(
        {
            "upstream": {"url": f"https://localhost:{srv.port}", "ca": str(trusted)},
            "server": {"tls_reload_interval": 0},  # SIGHUP only: reload_all is its handler
        }
    )
    client = certs.client_context()
    assert await _status(proxy.url, client) == 200  # and the connection is pooled
    upstream_live = next(c for c in _reloads(proxy).contexts if c.name == "upstream")
    trusted.write_text("not PEM at all\n")
    _reloads(proxy).reload_all()  # fails: the previous context (trusting the CA) stays
    assert (upstream_live.successes, upstream_live.failures) == (0, 1)
    assert await _status(proxy.url, client) == 200
    trustme.CA().cert_pem.write_to_path(str(trusted))
    _reloads(proxy).reload_all()
    assert upstream_live.successes == 1
    assert await _status(proxy.url, client) == 502  # the pooled one was closed, not reused


def _resume(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[Any, ...]:
    """One HTTP request on a fresh connection, offering ``session``: (status, session, reused)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as conn,
    ):
        conn.sendall(b"GET /r HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
        while conn.recv(4096):  # to the end: a TLS 1.3 ticket arrives after the handshake
            pass
        status = int(head.split(b" ")[1]) if head else "refused"
        return status, conn.session, conn.session_reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_session_from_before_the_reload_is_not_resumed(
    certs: Certs, upstream: Any, proxy_factory: Any, two_cas: Any, version: ssl.TLSVersion
) -> None:
    """Resumption skips certificate checks: a session from CA-A's time must not outlive it."""
    ca_a, ca_b, bundle = two_cas
    proxy = await _mtls_proxy(proxy_factory, certs, upstream, bundle)
    port = int(proxy.url.rsplit(":", 1)[1])
    from_a = certs.client_context(client=ca_a.issue_cert("a.test", common_name="a"))
    from_b = certs.client_context(client=ca_b.issue_cert("b.test", common_name="b"))
    for ctx in (from_a, from_b):
        ctx.minimum_version = ctx.maximum_version = version

    async def attempt(ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[Any, ...]:
        try:
            return await asyncio.to_thread(_resume, port, ctx, session)
        except (ssl.SSLError, ConnectionError):
            return ("refused", None, False)

    status, session_a, _ = await attempt(from_a, None)
    assert status == 200 and session_a is not None
    status, session_a, reused = await attempt(from_a, session_a)
    assert (status, reused) == (200, True)  # resumption works: the case below is real
    ca_b.cert_pem.write_to_path(str(bundle))
    _reloads(proxy).reload_all()
    assert (await attempt(from_a, session_a))[0] == "refused"
    assert (await attempt(from_a, None))[0] == "refused"
    await asyncio.sleep(1.1)  # sessions begun in the reload's second are treated as stale too
    assert _reloads(proxy).contexts[0].stale_refused == 1
    status, session_b, _ = await attempt(from_b, None)
    assert status == 200
    status, _, reused = await attempt(from_b, session_b)
    assert (status, reused) == (200, True)  # sessions from after the reload resume as before


async def test_a_new_upstream_client_certificate_is_used_after_reload(
    certs: Certs, proxy_factory: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="mutual hello")

    app = web.Application()
    app.router.add_get("/r", hello)
    client_ca = trustme.CA()  # the upstream trusts client certificates from this CA only
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certs.ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ca.configure_trust(server_ctx)
    srv = await aiohttp_server(app, host="127.0.0.1", ssl=server_ctx)
    cert, key = tmp_path / "up-client.pem", tmp_path / "up-client-key.pem"

    def install(leaf: trustme.LeafCert) -> None:
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))

    install(trustme.CA().issue_cert("sidecrypt.test"))  # a CA the upstream does not trust
    proxy = await proxy_factory(
        {
            "upstream": {
                "url": f"https://localhost:{srv.port}",
                "ca": str(certs.ca_file),
                "client_cert": str(cert),
                "client_key": str(key),
            },
            "server": {"tls_reload_interval": 0.05},
        }
    )
    client = certs.client_context()
    assert await _status(proxy.url, client) == 502
    install(client_ca.issue_cert("sidecrypt.test"))  # rotated on disk, no signal
    await _wait_reloaded(_reloads(proxy), "upstream", successes=1)
    assert await _status(proxy.url, client) == 200
