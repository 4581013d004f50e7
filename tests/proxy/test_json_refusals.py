"""JSON forms refused end to end (issue 16 classes 3-5): nothing reaches the upstream.

Duplicate keys on request.encrypt and request.decrypt routes, keys that fold alike, protected
names out of place; folded and dotted keys arrive encrypted; an upstream answer on a
response.encrypt route that repeats a key or drifts is a 502 and reaches no client.
Real sockets and TLS, the local keyring, a recording upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from tests.conftest import Certs, RunningProxy, Upstream

from sidecrypt.envelope import is_envelope
from sidecrypt.keyring import create_key

CANARY = "CANARY-json-4d2e"
FIELDS = ["$.ssn", "$.card.number", "$.contacts[*].phone"]

Setup = tuple[RunningProxy, Upstream, aiohttp.ClientSession]


async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
    """/out answers with the body given in the X-Answer header (for response.encrypt)."""
    if request.path.startswith("/out"):
        return web.Response(body=request.headers["X-Answer"], content_type="application/json")
    return web.Response(body=body or b"{}", content_type="application/json")


@pytest.fixture
async def setup(
    certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any
) -> AsyncIterator[Setup]:
    create_key(tmp_path / "keyring.json", "app")
    up = await upstream_factory(answer)
    raw = {
        "upstream": {"url": up.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json", "reload_interval": 0}},
        "routes": [
            {"match": {"path": "/users/**"}, "key": "app", "request": {"encrypt": FIELDS}},
            {"match": {"path": "/tokens/**"}, "key": "app", "request": {"decrypt": FIELDS}},
            {"match": {"path": "/out/**"}, "key": "app", "response": {"encrypt": FIELDS}},
        ],
    }
    proxy = await proxy_factory(raw, base_dir=tmp_path)
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        yield proxy, up, client


async def post(setup: Setup, path: str, body: bytes, **headers: str) -> tuple[int, Any]:
    proxy, _, client = setup
    headers["Content-Type"] = "application/json"
    async with client.post(proxy.url + path, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        (
            "/users/1",
            b'{"card":{"number":"' + CANARY.encode() + b'"},"card":{"x":1}}',
            "duplicate_key",
        ),
        ("/users/1", b'{"ssn":"' + CANARY.encode() + b'","\\u0073sn":"x"}', "duplicate_key"),
        ("/tokens/1", b'{"ssn":"' + CANARY.encode() + b'","ssn":"sc1.x"}', "duplicate_key"),
        ("/users/1", b'{"ssn":"x","SSN":"' + CANARY.encode() + b'"}', "ambiguous_key"),
        ("/users/1", b'{"contacts":{"phone":"' + CANARY.encode() + b'"}}', "unprotected_field"),
        ("/users/1", b'[{"ssn":"' + CANARY.encode() + b'"}]', "unprotected_field"),
        ("/users/1", b'{"user":{"ssn":4111111111111111}}', "unprotected_field"),
    ],
)
async def test_refused_and_nothing_forwarded(
    setup: Setup, path: str, body: bytes, code: str
) -> None:
    status, error = await post(setup, path, body)
    assert status == 400 and error["error"]["code"] == code
    assert CANARY not in orjson.dumps(error).decode()
    assert setup[1].seen == []


async def test_folded_and_dotted_keys_arrive_encrypted(setup: Setup) -> None:
    doc = {"\u017fsn": CANARY, "card.number": CANARY, "Contacts": [{"PHONE": CANARY}]}
    status, _ = await post(setup, "/users/1", orjson.dumps(doc))
    assert status == 200
    (seen,) = setup[1].seen
    assert CANARY.encode() not in seen.body
    stored = orjson.loads(seen.body)
    assert is_envelope(stored["\u017fsn"]) and is_envelope(stored["card.number"])
    assert is_envelope(stored["Contacts"][0]["PHONE"])


@pytest.mark.parametrize(
    "answer_body",
    [
        '{"ssn":"' + CANARY + '","ssn":"x"}',
        '{"data":{"ssn":"' + CANARY + '"}}',
        '{"Ssn":"x","ssn":"' + CANARY + '"}',
    ],
)
async def test_an_upstream_answer_that_would_leak_is_502(setup: Setup, answer_body: str) -> None:
    status, error = await post(setup, "/out/1", b"{}", **{"X-Answer": answer_body})
    assert status == 502 and error["error"]["code"] == "upstream_bad_body"
    assert CANARY not in orjson.dumps(error).decode()
