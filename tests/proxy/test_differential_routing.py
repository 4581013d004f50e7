"""Routing differentials end to end: methods, method overrides, path forms and rewrite headers.

An app behind sidecrypt may route a request where sidecrypt did not look: another method on a
protected path, an override header or ``_method`` field, a target its router normalizes
differently, a rewrite header. Through the real proxy (both engines, TLS, raw sockets so no
client library tidies the request up) the recording upstream never receives the canary, while
traffic on unprotected paths still passes byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from tests.conftest import Certs, RunningProxy, Upstream

from sidecrypt.envelope import is_envelope
from sidecrypt.keyring import create_key

CANARY = "CANARY-dr-5e17"
RECORD = {"name": "Ada", "ssn": f"{CANARY}-ssn", "card": {"number": "4111-1111"}}
BODY = json.dumps(RECORD).encode()
TIMEOUT = 10.0


def routes() -> list[dict[str, Any]]:
    ssn = {"encrypt": ["$.ssn"]}
    return [
        {"match": {"methods": ["POST"], "path": "/users/**"}, "key": "app", "request": ssn},
        {"match": {"methods": ["POST"], "path": "/orders/**"}, "key": "app", "request": ssn},
        {
            "match": {"methods": ["PUT"], "path": "/orders/**"},
            "key": "app",
            "request": {"encrypt": ["$.card.number"]},
        },
        {"match": {"methods": ["GET"], "path": "/accounts/**"}, "key": "app", "response": ssn},
        {"match": {"methods": ["PATCH"], "path": "/accounts/**"}, "key": "app", "response": ssn},
        {"match": {"methods": ["POST"], "path": "/accounts/**"}, "key": "app", "request": ssn},
        {"match": {"path": "/public/**"}},
    ]


Env = tuple[RunningProxy, Upstream, list[str]]


@pytest.fixture
async def env(tmp_path: Path, upstream_factory: Any, proxy_factory: Any) -> AsyncIterator[Env]:
    targets: list[str] = []

    async def echo(request: web.Request, body: bytes) -> web.StreamResponse:
        targets.append(request.raw_path)
        return web.Response(body=body, content_type="application/json")

    up = await upstream_factory(echo)
    create_key(tmp_path / "keyring.json", "app")
    proxy = await proxy_factory(
        {
            "upstream": {"url": up.url},
            "keys": {"app": {"provider": "local", "keyring": "keyring.json"}},
            "routes": routes(),
        },
        base_dir=tmp_path,
    )
    yield proxy, up, targets


async def send(
    proxy: RunningProxy,
    certs: Certs,
    method: str,
    target: str,
    body: bytes = BODY,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> tuple[int, bytes]:
    """One request written byte for byte; (status, body) of the answer."""
    port = int(proxy.url.rsplit(":", 1)[1])
    ctx: ssl.SSLContext = certs.client_context()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), TIMEOUT
    )
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    if body:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


def assert_no_canary(up: Upstream) -> None:
    assert CANARY.encode() not in up.all_bytes(), "a protected field reached the upstream"


# -- methods --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        "PUT",
        "PATCH",
        "DELETE",
        "OPTIONS",
        "PROPFIND",
        "PROPPATCH",
        "MKCOL",
        "COPY",
        "MOVE",
        "LOCK",
        "UNLOCK",
        "REPORT",
        "SEARCH",
        "MERGE",
        "PURGE",
        "M-SEARCH",
        "NOTIFY",
        "SUBSCRIBE",
        "LINK",
        "UNLINK",
        "QUERY",
        "BIND",
        "REBIND",
        "ACL",
        "MKCALENDAR",
    ],
)
async def test_every_method_with_a_body_on_a_protected_path_is_encrypted(
    env: Env, certs: Certs, method: str
) -> None:
    """The users route lists POST only: any other method's body there takes its rules."""
    proxy, up, _ = env
    status, answer = await send(proxy, certs, method, "/users/1")
    assert_no_canary(up)
    if status == 400 and up.seen == []:  # a method the client parser refuses outright
        return
    assert status == 200, answer
    assert [s.method for s in up.seen] == [method]
    assert is_envelope(json.loads(up.seen[0].body)["ssn"])


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_get_and_head_with_a_body_on_a_protected_path_are_refused(
    env: Env, certs: Certs, method: str
) -> None:
    proxy, up, _ = env
    status, answer = await send(proxy, certs, method, "/users/1")
    assert status == 400
    if method == "GET":
        assert error_code(answer) == "body_not_allowed"
    assert up.seen == []
    # Without a body (or with an empty one) they pass as before.
    status, _ = await send(proxy, certs, method, "/users/1", body=b"")
    assert status == 200 and [s.method for s in up.seen] == [method]
    status, _ = await send(
        proxy, certs, method, "/users/1", body=b"", headers={"Content-Length": "0"}
    )
    assert status == 200 and [s.method for s in up.seen] == [method, method]


@pytest.mark.parametrize("method", ["post", "Delete", "FOO", "X-CUSTOM", "BREW", "PROPPATCH "])
async def test_lowercase_and_unknown_tokens_never_carry_plaintext(
    env: Env, certs: Certs, method: str
) -> None:
    proxy, up, _ = env
    status, _ = await send(proxy, certs, method, "/users/1")
    assert_no_canary(up)
    assert status == 400 or is_envelope(json.loads(up.seen[0].body)["ssn"])


async def test_a_method_that_another_route_takes_without_request_rules_is_refused(
    env: Env, certs: Certs
) -> None:
    """GET and PATCH /accounts have response rules only; a body under them would skip the
    POST route's request rules."""
    proxy, up, _ = env
    status, answer = await send(proxy, certs, "GET", "/accounts/1")
    assert status == 400 and error_code(answer) == "body_not_allowed"
    status, answer = await send(proxy, certs, "PATCH", "/accounts/1")
    assert status == 405 and error_code(answer) == "method_not_protected"
    assert CANARY.encode() not in answer
    assert up.seen == []
    status, _ = await send(proxy, certs, "DELETE", "/accounts/1")  # no route lists DELETE
    assert status == 200
    assert is_envelope(json.loads(up.seen[0].body)["ssn"])
    assert_no_canary(up)


async def test_a_non_json_body_with_another_method_is_refused(env: Env, certs: Certs) -> None:
    proxy, up, _ = env
    status, _ = await send(
        proxy, certs, "PATCH", "/users/1", body=b"ssn=" + CANARY.encode(), content_type="text/plain"
    )
    assert status == 415
    assert up.seen == []


# -- method overrides -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "x-http-method-override"],
)
async def test_override_headers_never_reach_the_upstream(env: Env, certs: Certs, name: str) -> None:
    proxy, up, _ = env
    for target in ("/orders/1", "/public/1", "/elsewhere"):
        status, _ = await send(proxy, certs, "POST", target, headers={name: "PUT"})
        assert status == 200
    assert len(up.seen) == 3
    for seen in up.seen:
        assert all(h.lower() != name.lower() for h, _ in seen.headers)
    assert is_envelope(json.loads(up.seen[0].body)["ssn"])  # POST's rules, not PUT's


@pytest.mark.parametrize(
    "query",
    [
        "_method=PUT",
        "_method=put",
        "x=1&_method=PUT",
        "x=1;_method=PUT",
        "%5Fmethod=PUT",
        "%255Fmethod=PUT",
        "_METHOD=PUT",
        "_method[]=PUT",
        "_method=%50UT",
        "_method=+PUT+",
        "x-http-method-override=PUT",
    ],
)
async def test_a_method_override_field_that_changes_the_rules_is_refused(
    env: Env, certs: Certs, query: str
) -> None:
    """POST /orders encrypts ssn, PUT encrypts card.number: read as PUT, ssn is plaintext."""
    proxy, up, _ = env
    status, answer = await send(proxy, certs, "POST", f"/orders/1?{query}")
    assert status == 400 and error_code(answer) == "method_override"
    assert up.seen == []


@pytest.mark.parametrize(
    "key",
    ["_method", "_METHOD", " _method", "\\u005fmethod", "_\\u006Dethod", "x-http-method-override"],
)
async def test_a_json_method_override_that_changes_the_rules_is_refused(
    env: Env, certs: Certs, key: str
) -> None:
    """Laravel merges a JSON body into its input, and reads _method from there."""
    proxy, up, _ = env
    body = b'{"%s": "PUT", "ssn": "%s"}' % (key.encode(), CANARY.encode())
    status, answer = await send(proxy, certs, "POST", "/orders/1", body=body)
    assert status == 400 and error_code(answer) == "method_override"
    assert up.seen == []
    # A key that merely ends in "method" is data, not an override.
    body = b'{"payment_method": "PUT", "ssn": "%s"}' % CANARY.encode()
    status, _ = await send(proxy, certs, "POST", "/orders/1", body=body)
    assert status == 200
    assert_no_canary(up)


async def test_a_method_override_field_that_keeps_the_rules_passes(env: Env, certs: Certs) -> None:
    proxy, up, targets = env
    status, _ = await send(proxy, certs, "POST", "/users/1?_method=PATCH")  # same rules
    assert status == 200
    status, _ = await send(proxy, certs, "POST", "/public/x?_method=DELETE", body=b"{}")
    assert status == 200
    assert targets == ["/users/1?_method=PATCH", "/public/x?_method=DELETE"]
    assert_no_canary(up)


# -- path forms -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/users./1",
        "/users%2E/1",
        "/users%20/1",
        "/%20users/1",
        "/us%09ers/1",
        "/users%0a/1",
        "/users%00x/1",
        "/%2575sers/1",
        "/public/..%252Fusers/1",
        "/public%252F..%252Fusers/1",
        "/%u0075sers/1",
        "/%C1%B5sers/1",
        "/%EF%BD%95sers/1",
        "/public%EF%BC%8F..%EF%BC%8Fusers/1",
        "/u%E2%80%8Bsers/1",
        "/us%C2%ADers/1",
        "/u%C5%BFers/1",
        "/users..;/1",
        "/orders/..%252Fusers/1",
        "/users.json",
        "/users::$DATA/1",
        "/users+/1",
        "/users%3F/1",
        "/%C3%BCsers/1",
        "/%ED%A0%B5%ED%B0%AEsers/1",
    ],
)
async def test_targets_the_app_may_read_as_a_protected_path_are_refused(
    env: Env, certs: Certs, target: str
) -> None:
    proxy, up, _ = env
    for method in ("POST", "DELETE"):
        status, answer = await send(proxy, certs, method, target)
        if status == 404 and b"\n" in target.encode().replace(b"%0a", b"\n"):
            continue  # aiohttp's own router ("/{tail:.*}") stops at a newline: not forwarded
        assert status == 400, (target, answer)
        assert error_code(answer) == "ambiguous_path"
    assert up.seen == []


@pytest.mark.parametrize("target", ["/\uff55sers/1", "/u\u200bsers/1", "/users\uff0e/1"])
async def test_raw_unicode_targets_are_refused(env: Env, certs: Certs, target: str) -> None:
    """UTF-8 bytes sent unencoded in the request line: refused by the parser or by the rule."""
    proxy, up, _ = env
    status, _ = await send(proxy, certs, "POST", target)
    assert status == 400
    assert up.seen == []


@pytest.mark.parametrize(
    "target", ["/USERS/1", "/Users/1/", "/users;jsessionid=x/1", "/users/caf%C3%A9"]
)
async def test_canonical_forms_of_a_protected_path_are_encrypted(
    env: Env, certs: Certs, target: str
) -> None:
    proxy, up, targets = env
    status, _ = await send(proxy, certs, "POST", target)
    assert status == 200
    assert targets == [target]
    assert is_envelope(json.loads(up.seen[0].body)["ssn"])
    assert_no_canary(up)


@pytest.mark.parametrize(
    "target",
    [
        "/files/my%20report.pdf",
        "/public/caf%C3%A9?q=%20x",
        "/public/a%20b/",
        "/search/%E2%80%8B",
        "/Public/Caf%C3%A9%20Menu/?x=1&y=%2F",
        "/public/%2575",
        "/v1.2/Items/ABC",
    ],
)
async def test_unprotected_paths_stream_byte_for_byte(env: Env, certs: Certs, target: str) -> None:
    proxy, up, targets = env
    body = b'{"ssn": "not-protected-here", "x": [1, 2.50, "\\u00e9"]}'
    status, answer = await send(proxy, certs, "POST", target, body=body)
    assert status == 200
    assert answer == body
    assert targets == [target]
    assert up.seen[0].body == body


# -- rewrite headers ------------------------------------------------------------------------------

REWRITE_HEADERS = [
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Original-URI",
    "X-Original-Path",
    "X-Envoy-Original-Path",
    "X-Forwarded-Prefix",
    "X-Forwarded-Path",
    "X-Forwarded-Uri",
    "X-Script-Name",
    "X_Original_URL",
    "X-Forwarded_Prefix",
    "X-Original-Method",
    "SCRIPT_NAME",
    "X-Request-URI",
    "X-Matched-Path",
    "X-Invoke-Path",
    "X-Middleware-Rewrite",
]


@pytest.mark.parametrize("name", REWRITE_HEADERS)
async def test_rewrite_headers_never_reach_the_upstream(env: Env, certs: Certs, name: str) -> None:
    """An app that honours one would route /public/x as /users/1 with the body unencrypted."""
    proxy, up, targets = env
    for target in ("/public/x", "/users/1"):
        status, _ = await send(proxy, certs, "POST", target, headers={name: "/users/1"})
        assert status == 200
    assert targets == ["/public/x", "/users/1"]
    for seen in up.seen:
        names = {h.lower() for h, _ in seen.headers}
        assert name.lower() not in names
    assert is_envelope(json.loads(up.seen[1].body)["ssn"])
