"""Modes and the response side.

Client-side mode: sidecrypt listens on loopback (plain http) beside a local client and talks TLS
to a remote server that only ever sees ciphertext. Server-side response rules: what happens when
the upstream answers gzip, non-JSON or broken JSON on a route that transforms responses.
"""

from __future__ import annotations

import gzip
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from tests.conftest import Certs, Upstream

from sidecrypt import config
from sidecrypt.envelope import is_envelope, parse
from sidecrypt.errors import ConfigError
from sidecrypt.keyring import create_key

CANARY = "CANARY-modes-3c1d"
RECORD = {"id": 1, "ssn": f"{CANARY}-ssn", "card": {"number": 4111111111111111}, "ok": True}
FIELDS = ["$.ssn", "$.card.number"]


def keys_block(tmp_path: Path) -> dict[str, Any]:
    create_key(tmp_path / "keyring.json", "app")
    return {"app": {"provider": "local", "keyring": str(tmp_path / "keyring.json")}}


def store_handler(store: dict[str, bytes]) -> Any:
    async def handler(request: web.Request, body: bytes) -> web.Response:
        if request.method in ("POST", "PUT"):
            store[request.path] = body
            return web.Response(body=body, content_type="application/json", status=201)
        return web.Response(body=store[request.path], content_type="application/json")

    return handler


def client_side(
    upstream: dict[str, Any], address: str = "127.0.0.1:0", **extra: Any
) -> dict[str, Any]:
    """A client-side config: sidecrypt on ``address`` (loopback unless TLS) beside the client."""
    return {"mode": "client-side", "listen": {"address": address}, "upstream": upstream, **extra}


def records_route(**rules: Any) -> list[dict[str, Any]]:
    return [{"match": {"path": "/records/**"}, "key": "app", **rules}]


async def tls_remote(upstream_factory: Any, ca: trustme.CA, handler: Any = None) -> Upstream:
    """A remote server on https://localhost with a certificate from ``ca``."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    if handler is None:
        return await upstream_factory(ssl=server_ctx)
    return await upstream_factory(handler, ssl=server_ctx)


def https_localhost(remote: Upstream) -> str:
    return "https://localhost:" + remote.url.rsplit(":", 1)[1]


def config_error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(raw, file="c.yaml")
    return str(info.value)


# -- client-side mode -------------------------------------------------------------------------


async def test_client_side_remote_sees_only_ciphertext(
    certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any
) -> None:
    store: dict[str, bytes] = {}
    remote = await tls_remote(upstream_factory, certs.ca, store_handler(store))
    raw = client_side(
        {"url": https_localhost(remote), "ca": str(certs.ca_file)},
        keys=keys_block(tmp_path),
        routes=records_route(
            context={"app": "crm"}, request={"encrypt": FIELDS}, response={"decrypt": FIELDS}
        ),
    )
    proxy = await proxy_factory(raw, tls=False)
    assert proxy.url.startswith("http://127.0.0.1:")
    async with aiohttp.ClientSession() as client:
        async with client.put(f"{proxy.url}/records/1", json=RECORD) as resp:
            assert resp.status == 201
            assert await resp.json() == RECORD
        async with client.get(f"{proxy.url}/records/1") as resp:
            assert resp.status == 200
            assert await resp.json() == RECORD
    assert CANARY.encode() not in remote.all_bytes()
    assert b"4111111111111111" not in remote.all_bytes()
    stored = json.loads(store["/records/1"])
    assert is_envelope(stored["ssn"]) and is_envelope(stored["card"]["number"])
    assert parse(stored["ssn"]).context == (("app", "crm"),)
    assert stored["id"] == 1 and stored["ok"] is True
    # The remote was reached over TLS that sidecrypt verified against the configured CA.
    assert dict(remote.seen[0].headers)["X-Forwarded-Proto"] == "http"


async def test_client_side_refuses_an_upstream_it_cannot_verify(
    certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any
) -> None:
    remote = await tls_remote(upstream_factory, trustme.CA())  # a CA sidecrypt does not trust
    raw = client_side(
        {"url": https_localhost(remote), "ca": str(certs.ca_file)},
        keys=keys_block(tmp_path),
        routes=records_route(request={"encrypt": FIELDS}),
    )
    proxy = await proxy_factory(raw, tls=False)
    async with (
        aiohttp.ClientSession() as client,
        client.put(f"{proxy.url}/records/1", json=RECORD) as resp,
    ):
        assert resp.status == 502
        assert CANARY not in await resp.text()
    assert remote.seen == []


def test_client_side_refuses_plain_http_upstream_at_config_time() -> None:
    raw = client_side({"url": "http://api.example.com"}, "127.0.0.1:8080")
    error = config_error(raw)
    assert "upstream.url" in error and "allow_plain_upstream" in error
    ok = config.parse({**raw, "allow_plain_upstream": True}, file="c.yaml")
    assert ok.mode == "client-side"
    # Server-side mode has no such rule: the app behind a sidecar is usually plain http.
    config.parse({"upstream": {"url": "http://127.0.0.1:8080"}})


def test_client_side_without_tls_must_listen_on_loopback() -> None:
    error = config_error(client_side({"url": "https://api.example.com"}, "0.0.0.0:8080"))
    assert "listen.address" in error and "loopback" in error


async def test_client_side_plain_upstream_when_explicitly_allowed(
    tmp_path: Path, upstream: Upstream, proxy_factory: Any
) -> None:
    raw = client_side(
        {"url": upstream.url},
        allow_plain_upstream=True,
        keys=keys_block(tmp_path),
        routes=records_route(request={"encrypt": FIELDS}, response={"decrypt": FIELDS}),
    )
    proxy = await proxy_factory(raw, tls=False)
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/records/1", json=RECORD) as resp,
    ):
        assert await resp.json() == RECORD  # echoed ciphertext, decrypted on the way back
    assert CANARY.encode() not in upstream.all_bytes()


# -- the response side (server-side mode) -----------------------------------------------------


def response_config(up: Upstream, tmp_path: Path) -> dict[str, Any]:
    return {
        "upstream": {"url": up.url},
        "keys": keys_block(tmp_path),
        "routes": [
            {
                "match": {"path": "/dec/**"},
                "key": "app",
                "request": {"encrypt": FIELDS},
                "response": {"decrypt": FIELDS},
            },
            {"match": {"path": "/enc/**"}, "key": "app", "response": {"encrypt": FIELDS}},
            {
                "match": {"path": "/lenient/**"},
                "key": "app",
                "request": {"encrypt": FIELDS},
                "response": {"decrypt": FIELDS},
                "on_decrypt_error": "ciphertext",
            },
        ],
    }


@pytest.fixture
async def responder(certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any) -> Any:
    """An upstream whose next answer the test sets: (body bytes, headers)."""
    answer: dict[str, Any] = {"body": b"{}", "headers": {"Content-Type": "application/json"}}
    store: dict[str, bytes] = {}

    async def handler(request: web.Request, body: bytes) -> web.Response:
        if request.method == "PUT":
            store[request.path.split("/")[-1]] = body
            return web.Response(status=204)
        if request.path.startswith(("/dec/stored", "/lenient/stored")):
            return web.Response(body=answer["stored"], content_type="application/json")
        return web.Response(body=answer["body"], headers=answer["headers"])

    up = await upstream_factory(handler)
    proxy = await proxy_factory(response_config(up, tmp_path))
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as client:
        yield proxy, up, client, answer, store


async def test_response_encrypt_route_encrypts_fields(responder: Any) -> None:
    proxy, _, client, answer, _ = responder
    answer["body"] = json.dumps(RECORD).encode()
    async with client.get(f"{proxy.url}/enc/1") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert is_envelope(body["ssn"]) and is_envelope(body["card"]["number"])
    assert body["id"] == 1


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("text/plain", f"ssn={CANARY}".encode()),
        ("text/html", f"<p>{CANARY}</p>".encode()),
        ("application/octet-stream", CANARY.encode()),
    ],
)
async def test_non_json_response_on_encrypt_route_is_502(
    responder: Any, ctype: str, body: bytes
) -> None:
    proxy, _, client, answer, _ = responder
    answer["body"], answer["headers"] = body, {"Content-Type": ctype}
    async with client.get(f"{proxy.url}/enc/1") as resp:
        text = await resp.text()
        assert resp.status == 502, text
    assert CANARY not in text
    assert json.loads(text)["error"]["code"] == "upstream_not_json"


@pytest.mark.parametrize(
    "body",
    [
        b'{"ssn": "' + CANARY.encode() + b'", ',  # truncated
        b'{"ssn": "' + CANARY.encode() + b'", "n": 1e999, "m": 12345678901234567890123}',
    ],
)
async def test_broken_json_response_on_encrypt_route_is_502(responder: Any, body: bytes) -> None:
    """The upstream's broken JSON is not the client's fault: 502, and nothing of it leaks."""
    proxy, _, client, answer, _ = responder
    answer["body"] = body
    async with client.get(f"{proxy.url}/enc/1") as resp:
        text = await resp.text()
        assert resp.status == 502, text
    assert CANARY not in text


async def test_gzip_response_on_transform_routes_is_refused(responder: Any) -> None:
    proxy, up, client, answer, _ = responder
    answer["body"] = gzip.compress(json.dumps(RECORD).encode())
    answer["headers"] = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    for prefix in ("dec", "enc"):
        async with client.get(
            f"{proxy.url}/{prefix}/1", headers={"Accept-Encoding": "gzip"}
        ) as resp:
            raw = await resp.read()
            assert resp.status == 502
            assert json.loads(raw)["error"]["code"] == "upstream_encoding"
        assert CANARY.encode() not in raw
    # sidecrypt asked the upstream for an identity body on both routes.
    assert all(dict(s.headers).get("Accept-Encoding") == "identity" for s in up.seen)


async def test_non_json_response_on_decrypt_route_passes_through(responder: Any) -> None:
    proxy, _, client, answer, _ = responder
    answer["body"], answer["headers"] = b"<html>hello</html>", {"Content-Type": "text/html"}
    async with client.get(f"{proxy.url}/dec/1") as resp:
        assert resp.status == 200
        assert await resp.read() == b"<html>hello</html>"
        assert resp.headers["Content-Type"].startswith("text/html")


async def test_tampered_response_token(responder: Any) -> None:
    proxy, _, client, answer, store = responder
    async with client.put(f"{proxy.url}/dec/stored", json=RECORD) as resp:
        assert resp.status == 204
    stored = json.loads(store["stored"])
    token = stored["ssn"]
    i = len(token) - 10  # inside the ciphertext/tag
    stored["ssn"] = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    answer["stored"] = json.dumps(stored).encode()
    async with client.get(f"{proxy.url}/dec/stored") as resp:
        text = await resp.text()
        assert resp.status == 502
        assert json.loads(text)["error"]["code"] == "decrypt_failed"
    assert CANARY not in text
    # on_decrypt_error: ciphertext leaves the bad token as it is and opens the good ones.
    async with client.get(f"{proxy.url}/lenient/stored") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["ssn"] == stored["ssn"]
    assert body["card"]["number"] == 4111111111111111
