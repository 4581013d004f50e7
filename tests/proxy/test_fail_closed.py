"""Fail closed: whatever goes wrong on a route that must encrypt, the upstream receives nothing.

Every refusal is a JSON ``{"error": {"code", "message"}}`` body that never carries a field value.
Real sockets and TLS; the key provider is the real local keyring (made unusable while the proxy
runs) or a plugin provider that raises.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiohttp
import pytest
from aiohttp import web
from tests.conftest import Certs, RunningProxy, Upstream

from sidecrypt import hookimpl
from sidecrypt.envelope import is_envelope, parse
from sidecrypt.keyring import create_key
from sidecrypt.keys import DataKey, KeyProvider, ProviderOptions
from sidecrypt.proxy.fields import PlaintextGuardError, assert_no_plaintext
from sidecrypt.proxy.routes import compile_fields

CANARY = "CANARY-fc-91b2"
RECORD = {"name": "Ada", "ssn": f"{CANARY}-ssn", "card": {"number": f"{CANARY}-card"}}
LIMIT = 2048


def base_config(up: Upstream, **extra: Any) -> dict[str, Any]:
    fields = [{"path": "$.ssn", "required": True}, "$.card.number"]
    return {
        "upstream": {"url": up.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json", "reload_interval": 0}},
        "data_keys": {"max_uses": 1},  # no cached data key hides a provider failure
        "routes": [
            {
                "match": {"path": "/tenants/*/users/**"},
                "key": "app",
                "context": {"tenant": "header:X-Tenant"},
                "request": {"encrypt": fields},
                "response": {"decrypt": fields},
            },
            {
                "match": {"methods": ["*"], "path": "/users/**"},
                "key": "app",
                "request": {"encrypt": fields},
                "response": {"decrypt": fields},
                "max_body_size": LIMIT,
            },
            {
                "match": {"methods": ["POST"], "path": "/accounts/{id}"},
                "key": "app",
                "request": {"encrypt": fields},
            },
            {"match": {"path": "/profiles/**"}, "key": "app", "request": {"encrypt": ["$.ssn"]}},
        ],
        **extra,
    }


@pytest.fixture
async def setup(
    certs: Certs, tmp_path: Path, upstream: Upstream, proxy_factory: Any
) -> AsyncIterator[tuple[RunningProxy, Upstream, aiohttp.ClientSession, Path]]:
    keyring = tmp_path / "keyring.json"
    create_key(keyring, "app")
    proxy = await proxy_factory(base_config(upstream), base_dir=tmp_path)
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        yield proxy, upstream, client, keyring


Setup = tuple[RunningProxy, Upstream, aiohttp.ClientSession, Path]


async def expect_error(
    resp: aiohttp.ClientResponse, status: int, code: str | None = None
) -> dict[str, Any]:
    text = await resp.text()
    assert resp.status == status, text
    assert CANARY not in text
    assert resp.content_type == "application/json"
    body: dict[str, Any] = json.loads(text)
    assert set(body) == {"error"}
    assert {"code", "message"} <= set(body["error"])
    assert all(isinstance(body["error"][k], str) for k in ("code", "message"))
    if code is not None:
        assert body["error"]["code"] == code
    return body


async def test_sanity_a_good_request_is_encrypted(setup: Setup) -> None:
    proxy, up, client, _ = setup
    async with client.post(f"{proxy.url}/users/1", json=RECORD) as resp:
        assert resp.status == 200
        assert await resp.json() == RECORD  # the echo upstream returns it; decrypted back
    assert len(up.seen) == 1
    sent = json.loads(up.seen[0].body)
    assert is_envelope(sent["ssn"]) and is_envelope(sent["card"]["number"])
    assert CANARY.encode() not in up.all_bytes()


@pytest.mark.parametrize("how", ["loosened", "removed", "garbage"])
async def test_keyring_broken_after_start_is_503_and_nothing_forwarded(
    setup: Setup, how: str
) -> None:
    proxy, up, client, keyring = setup
    async with client.post(f"{proxy.url}/users/1", json=RECORD) as resp:
        assert resp.status == 200
    up.seen.clear()
    if how == "loosened":
        keyring.chmod(0o644)
    elif how == "removed":
        keyring.unlink()
    else:
        keyring.write_bytes(b"{not a keyring")
        keyring.chmod(0o600)
    for _ in range(2):  # the failure is not cached as success, nor forgotten
        async with client.post(f"{proxy.url}/users/1", json=RECORD) as resp:
            body = await expect_error(resp, 503, "key_provider_unavailable")
            assert int(resp.headers["Retry-After"]) > 0
    assert str(keyring) in body["error"]["message"] or "keyring" in body["error"]["message"]
    assert up.seen == []


class BrokenOptions(ProviderOptions):
    provider: Literal["broken"] = "broken"


class BrokenProvider:
    """A provider whose backend is down: every call raises a non-sidecrypt exception."""

    type_name: ClassVar[str] = "broken"
    options_model: ClassVar[type[ProviderOptions]] = BrokenOptions

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> BrokenProvider:
        return cls(name)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        raise ConnectionError(f"backend down while handling {CANARY}")

    async def decrypt_data_key(
        self, wrapped: bytes, key_version: int, context: Mapping[str, str]
    ) -> bytes:
        raise ConnectionError("backend down")

    async def check_ready(self) -> None:
        raise ConnectionError("backend down")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "provider": self.type_name}


class BrokenPlugin:
    @hookimpl
    def sidecrypt_key_provider_types(self) -> list[type[KeyProvider]]:
        return [BrokenProvider]


async def test_provider_raising_is_503_with_retry_after(
    certs: Certs, upstream: Upstream, proxy_factory: Any, tmp_path: Path
) -> None:
    raw = base_config(upstream)
    raw["keys"] = {"app": {"provider": "broken"}}
    proxy = await proxy_factory(raw, base_dir=tmp_path, plugins=(BrokenPlugin(),))
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with (
        aiohttp.ClientSession(connector=connector) as client,
        client.post(f"{proxy.url}/users/1", json=RECORD) as resp,
    ):
        await expect_error(resp, 503, "key_provider_unavailable")
        assert resp.headers["Retry-After"].isdigit()
    assert upstream.seen == []


def big_record(size: int) -> bytes:
    return json.dumps({**RECORD, "pad": "x" * size}).encode()


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 512):
        yield data[i : i + 512]
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("name", "kwargs", "status", "code"),
    [
        ("malformed", {"data": b'{"ssn": "' + CANARY.encode() + b'",'}, 400, "malformed_json"),
        ("text", {"data": json.dumps(RECORD), "ctype": "text/plain"}, 415, None),
        (  # forms are encrypted field by field now; one in another charset is still refused
            "form",
            {
                "data": f"ssn={CANARY}",
                "ctype": "application/x-www-form-urlencoded; charset=iso-8859-1",
            },
            415,
            None,
        ),
        ("no-type", {"data": json.dumps(RECORD).encode(), "ctype": None}, 415, None),
        ("too-big", {"data": big_record(LIMIT)}, 413, "body_too_large"),
        ("too-big-chunked", {"data": big_record(4 * LIMIT), "chunked": True}, 413, None),
        ("gzip", {"data": gzip.compress(json.dumps(RECORD).encode()), "enc": "gzip"}, 415, None),
        (
            "gzip-chunked",
            {"data": gzip.compress(json.dumps(RECORD).encode()), "enc": "gzip", "chunked": True},
            415,
            None,
        ),
        (
            "required-missing",
            {"data": json.dumps({"card": {"number": CANARY}})},
            400,
            "missing_field",
        ),
        # A 19+ digit integer takes the stdlib parser: it must refuse what orjson refuses.
        (
            "deep-bigint",
            {
                "data": b'{"ssn": "'
                + CANARY.encode()
                + b'", "n": '
                + b"[" * 3000
                + b"12345678901234567890123"
                + b"]" * 3000
                + b"}",
                "url": "/accounts/1",
            },
            400,
            "malformed_json",
        ),
        (
            "overflow-bigint",
            {"data": b'{"ssn": 1e999, "n": 12345678901234567890123}'},
            400,
            "malformed_json",
        ),
        (
            "surrogate-bigint",
            {"data": b'{"ssn": "\\ud800", "n": 12345678901234567890123}'},
            400,
            "malformed_json",
        ),
    ],
)
async def test_refused_requests_forward_nothing(
    setup: Setup, name: str, kwargs: dict[str, Any], status: int, code: str | None
) -> None:
    proxy, up, client, _ = setup
    data: Any = kwargs["data"]
    if kwargs.get("chunked"):
        data = chunks(data if isinstance(data, bytes) else data.encode())
    headers = {}
    ctype = kwargs.get("ctype", "application/json")
    if ctype is not None:
        headers["Content-Type"] = ctype
    if "enc" in kwargs:
        headers["Content-Encoding"] = kwargs["enc"]
    url = proxy.url + kwargs.get("url", "/users/1")
    async with client.post(url, data=data, headers=headers) as resp:
        await expect_error(resp, status, code)
    assert up.seen == []


async def test_a_chunked_body_over_the_limit_that_arrived_whole_is_413(
    setup: Setup, certs: Certs
) -> None:
    """Sent in one write, the whole body is in before the route reads it (no chunk-by-chunk
    read whose running total would refuse it): the limit must hold all the same."""
    proxy, up, _, _ = setup
    body = big_record(LIMIT)
    head = (
        b"POST /users/1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection(
        "localhost", port, ssl=certs.client_context(), server_hostname="localhost"
    )
    writer.write(head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_too_large"
    assert up.seen == []


@pytest.mark.parametrize("delivery", ["whole", "streamed"])
async def test_an_upstream_answer_over_the_route_limit_is_502(
    certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any, delivery: str
) -> None:
    """Whether the answer arrived whole before it was read or comes in pieces, it is refused
    (502) and nothing of it reaches the client."""
    doc = json.dumps({**RECORD, "pad": "x" * (2 * LIMIT)}).encode()

    async def big(request: web.Request, body: bytes) -> web.StreamResponse:
        if delivery == "whole":
            return web.Response(body=doc, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(doc), 256):
            await resp.write(doc[i : i + 256])
            await asyncio.sleep(0.001)
        await resp.write_eof()
        return resp

    up = await upstream_factory(big)
    create_key(tmp_path / "keyring.json", "app")
    proxy = await proxy_factory(base_config(up), base_dir=tmp_path)
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with (
        aiohttp.ClientSession(connector=connector) as client,
        client.get(f"{proxy.url}/users/1") as resp,
    ):
        await expect_error(resp, 502, "upstream_response_too_large")


async def test_missing_or_repeated_context_header_is_400(setup: Setup) -> None:
    proxy, up, client, _ = setup
    url = f"{proxy.url}/tenants/acme/users/1"
    async with client.post(url, json=RECORD) as resp:
        await expect_error(resp, 400, "missing_context")
    async with client.post(url, json=RECORD, headers={"X-Tenant": ""}) as resp:
        await expect_error(resp, 400, "missing_context")
    headers = [("X-Tenant", "acme"), ("X-Tenant", "evil")]
    async with client.post(url, json=RECORD, headers=headers) as resp:
        await expect_error(resp, 400, "ambiguous_context")
    assert up.seen == []
    async with client.post(url, json=RECORD, headers={"X-Tenant": "acme"}) as resp:
        assert resp.status == 200
    assert parse(json.loads(up.seen[0].body)["ssn"]).context == (("tenant", "acme"),)


def test_plaintext_guard_names_the_path_never_the_value() -> None:
    """The guard cannot be provoked through HTTP (every slot is sealed first); check it directly."""
    specs = compile_fields(["$.ssn", "$.contacts[*].phone"])
    ok = {"ssn": "sc1.AAAA", "contacts": [{"phone": "sc1.BBBB"}]}
    assert_no_plaintext(ok, specs)
    for doc in (
        {"ssn": CANARY},
        {"ssn": "sc1.AAAA", "contacts": [{"phone": "sc1.x"}, {"phone": CANARY}]},
        {"ssn": 12345},
        {"ssn": None},
    ):
        with pytest.raises(PlaintextGuardError) as info:
            assert_no_plaintext(doc, specs)
        assert CANARY not in str(info.value) and "12345" not in str(info.value)
        assert info.value.status == 500 and info.value.to_json()["error"]["code"]


# -- path tricks: raw requests, so no client library normalises the path for us ---------------


async def raw_request(
    proxy: RunningProxy, certs: Certs, method: str, path: str, body: bytes = b""
) -> tuple[int, bytes]:
    port = int(proxy.url.rsplit(":", 1)[1])
    ctx: ssl.SSLContext = certs.client_context()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    "path",
    [
        "/users/../users/1",
        "/public/../users/1",
        "/public/%2e%2e/users/1",
        "/public/..%2Fusers/1",
        "/public%2F..%2Fusers/1",
        "/users/./1",
        "/public%5c..%5cusers/1",
    ],
)
async def test_ambiguous_paths_are_refused(setup: Setup, certs: Certs, path: str) -> None:
    proxy, up, _, _ = setup
    status, body = await raw_request(proxy, certs, "POST", path, json.dumps(RECORD).encode())
    assert status == 400, body
    assert json.loads(body)["error"]["code"] == "ambiguous_path"
    assert up.seen == []


@pytest.mark.parametrize(
    "path",
    [
        "//users/1",  # nginx merge_slashes, many routers: the upstream reads /users/1
        "/users//1",
        "/accounts/7/",  # a trailing slash: Spring (<6), Django APPEND_SLASH, Flask redirects
        "/accounts//7",
        "/accounts;jsessionid=x/7",  # matrix parameters: Tomcat/Spring drop them
        "/accounts/7;v=1",
        "/%61ccounts/7",
    ],
)
async def test_path_variants_the_upstream_may_normalise_never_carry_plaintext(
    setup: Setup, certs: Certs, path: str
) -> None:
    proxy, up, _, _ = setup
    status, body = await raw_request(proxy, certs, "POST", path, json.dumps(RECORD).encode())
    assert CANARY.encode() not in up.all_bytes(), f"{path} reached the upstream in plaintext"
    if status == 400:  # refused outright is fine too
        assert json.loads(body)["error"]["code"] == "ambiguous_path"
        assert up.seen == []
    else:
        assert len(up.seen) == 1
        assert is_envelope(json.loads(up.seen[0].body)["ssn"])


@pytest.mark.parametrize("target", ["//127.0.0.1:{port}/steal", "http://127.0.0.1:{port}/steal"])
async def test_request_target_cannot_pick_another_host(
    setup: Setup, certs: Certs, upstream_factory: Any, target: str
) -> None:
    """``//host/path`` and absolute-form targets must not make sidecrypt an open proxy."""
    proxy, up, _, _ = setup
    other = await upstream_factory()
    port = int(other.url.rsplit(":", 1)[1])
    status, _ = await raw_request(
        proxy, certs, "POST", target.format(port=port), json.dumps(RECORD).encode()
    )
    assert other.seen == [], "the request went to a host the client chose"
    assert CANARY.encode() not in up.all_bytes()
    assert status in (400, 404), status


async def test_lowercase_method_is_refused_before_routing(setup: Setup, certs: Certs) -> None:
    proxy, up, _, _ = setup
    status, _ = await raw_request(proxy, certs, "post", "/users/1", json.dumps(RECORD).encode())
    assert status == 400
    assert up.seen == []


async def test_head_on_an_encrypt_route(setup: Setup) -> None:
    proxy, up, client, _ = setup
    async with client.head(f"{proxy.url}/users/1") as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    assert [s.method for s in up.seen] == ["HEAD"]
    # A HEAD that carries a JSON body on a route for every method is still encrypted.
    up.seen.clear()
    async with client.request("HEAD", f"{proxy.url}/users/1", json=RECORD) as resp:
        assert resp.status in (200, 400)
    assert CANARY.encode() not in up.all_bytes()


async def test_error_bodies_never_echo_values_from_the_request(setup: Setup) -> None:
    proxy, up, client, _ = setup
    hostile = {"ssn": CANARY, "card": {"number": CANARY}, CANARY: CANARY}
    async with client.post(
        f"{proxy.url}/users/1", data=json.dumps(hostile), headers={"Content-Type": "text/x"}
    ) as resp:
        await expect_error(resp, 415)
    async with client.post(
        f"{proxy.url}/tenants/{CANARY}/users/1", json=hostile, headers={"X-Request-Id": "r1"}
    ) as resp:
        body = await expect_error(resp, 400, "missing_context")
        assert body["error"].get("request_id") == "r1"
    assert up.seen == []
    assert os.environ.get("SIDECRYPT_TEST_NEVER_SET") is None


async def test_json_patch_cannot_slip_values_past_the_selectors(setup: Setup) -> None:
    """RFC 6902 puts values under "value", where no field selector looks: refuse, never forward."""
    proxy, up, client, _ = setup
    patch = [{"op": "replace", "path": "/ssn", "value": CANARY}]
    async with client.patch(
        f"{proxy.url}/profiles/1",
        data=json.dumps(patch),
        headers={"Content-Type": "application/json-patch+json"},
    ) as resp:
        await expect_error(resp, 415, "unsupported_media_type")
    assert up.seen == []
    # A JSON merge patch (RFC 7396) has the document's shape: its fields are encrypted.
    async with client.patch(
        f"{proxy.url}/profiles/1",
        data=json.dumps({"ssn": CANARY}),
        headers={"Content-Type": "application/merge-patch+json"},
    ) as resp:
        assert resp.status == 200
    assert is_envelope(json.loads(up.seen[0].body)["ssn"])
    assert CANARY.encode() not in up.all_bytes()


async def test_method_override_and_path_case_cannot_skip_the_rules(
    tmp_path: Path, upstream: Any, proxy_factory: Any, certs: Any
) -> None:
    """Upstreams may honour X-HTTP-Method-Override or route /USERS as /users: neither may
    carry plaintext past a route that encrypts. The override never reaches the upstream, and
    the POST body on a path only PUT lists is protected by the PUT route's rules."""
    create_key(tmp_path / "ring.json", "app")
    proxy = await proxy_factory(
        {
            "upstream": {"url": upstream.url},
            "keys": {"app": {"provider": "local", "keyring": str(tmp_path / "ring.json")}},
            "routes": [
                {
                    "match": {"methods": ["PUT"], "path": "/users/{id}"},
                    "key": "app",
                    "request": {"encrypt": ["$.ssn"]},
                }
            ],
        }
    )
    ctx = certs.client_context()
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/users/1",
            json={"ssn": "canary-override"},
            ssl=ctx,
            headers={"x-http-method-override": "PUT"},
        ) as r:
            assert r.status == 200
        async with s.put(proxy.url + "/USERS/1", json={"ssn": "canary-case"}, ssl=ctx) as r:
            assert r.status == 200
    assert b"canary-override" not in upstream.all_bytes()
    assert b"canary-case" not in upstream.all_bytes()
    assert len(upstream.seen) == 2 and all(b"sc1." in seen.body for seen in upstream.seen)
    assert all(name.lower() != "x-http-method-override" for name, _ in upstream.seen[0].headers)


async def test_a_stalled_request_body_times_out_and_forwards_nothing(
    tmp_path: Path, upstream: Any, proxy_factory: Any, certs: Any
) -> None:
    create_key(tmp_path / "ring.json", "app")
    proxy = await proxy_factory(
        {
            "upstream": {"url": upstream.url},
            "server": {"body_timeout": 0.3},
            "keys": {"app": {"provider": "local", "keyring": str(tmp_path / "ring.json")}},
            "routes": [
                {"match": {"path": "/users"}, "key": "app", "request": {"encrypt": ["$.ssn"]}}
            ],
        }
    )
    status, _ = await send_and_stall(
        proxy,
        certs,
        b"POST /users HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"ssn": "canary-stall',
    )
    assert b" 408 " in status
    assert upstream.seen == []


async def send_and_stall(proxy: Any, certs: Any, data: bytes) -> tuple[bytes, bytes]:
    """Send ``data`` (a head and part of its body), then nothing: the status line and the rest."""
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=certs.client_context(), server_hostname="localhost"
    )
    try:
        writer.write(data)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        return status, await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


async def test_a_stalled_small_body_on_a_pass_through_route_times_out(
    upstream: Any, proxy_factory: Any, certs: Any
) -> None:
    """Bodies up to 256 KiB with a length are read whole before forwarding: bounded too."""
    proxy = await proxy_factory(
        {"upstream": {"url": upstream.url}, "server": {"body_timeout": 0.3}}
    )
    status, head_and_body = await send_and_stall(
        proxy,
        certs,
        b"POST /anything HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 1000\r\n\r\nonly ten b",
    )
    assert b" 408 " in status
    assert b'"body_timeout"' in head_and_body
    assert upstream.seen == []
