"""Server-side field encryption end to end: real sockets, real TLS, a real keyring, no mocks.

A small dict-backed "legacy app" stores JSON exactly as received. Configured fields must reach it
only as ``sc1.`` tokens (a canary plaintext appears nowhere it can see), and the client must read
back its original values with their original JSON types. Context binding, moved tokens, rotation
while running and log/audit hygiene are checked through the same proxy.
"""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.conftest import Certs, RunningProxy, Upstream

from sidecrypt import hookimpl
from sidecrypt.envelope import is_envelope, parse
from sidecrypt.events import AuditEvent
from sidecrypt.keyring import create_key, rotate_key

CANARY = "CANARY-e2e-7f3a9c"
FIELDS = ["$.ssn", "$.card.number", "$.contacts[*].phone"]

RECORDS: list[dict[str, Any]] = [
    {
        "name": "Ada",
        "ssn": f"{CANARY}-123-45-6789",
        "card": {"number": 123456789012345678901234567890, "exp": "12/30"},
        "contacts": [
            {"kind": "home", "phone": f"☎ {CANARY} +44 20 7946 0018 ü"},
            {"kind": "none", "phone": None},
            {"kind": "flag", "phone": True},
            {"kind": "int", "phone": 442079460018},
            {"kind": "float", "phone": 1.5},
            {"kind": "nested", "phone": {"ext": [1, f"{CANARY}-ext", False, None], "o": {}}},
            {"kind": "array", "phone": [f"{CANARY}-a", -7, []]},
        ],
        "active": True,
    },
    {
        "name": "Bob",
        "ssn": {"country": "FR", "value": f"{CANARY}-fr", "digits": [1, 2, 3]},
        "card": {"number": False},
        "contacts": [],
    },
    {"name": "Cy", "ssn": None, "card": {"number": -(2**70)}, "extra": "日本語"},
]


def strict(value: Any) -> Any:
    """A form where True != 1 and 1.0 != 1: compare JSON values with their types."""
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict(v) for v in value]
    return (type(value).__name__, value)


def make_keyring(tmp_path: Path) -> Path:
    path = tmp_path / "keyring.json"
    create_key(path, "app")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return path


def store_app(store: dict[str, Any]) -> Callable[[web.Request, bytes], Awaitable[web.Response]]:
    """A legacy JSON app: POST /users creates, GET/PUT /users/{id}, GET /users lists."""

    async def app(request: web.Request, body: bytes) -> web.Response:
        parts = request.path.strip("/").split("/")
        if request.method == "POST" and parts == ["users"]:
            key = str(len(store) + 1)
            store[key] = json.loads(body)
            return web.json_response({"id": key, **store[key]}, status=201)
        if request.method == "PUT" and len(parts) == 2:
            store[parts[1]] = json.loads(body)
            return web.json_response(store[parts[1]])
        if request.method == "GET" and parts == ["users"]:
            return web.json_response(list(store.values()))
        if request.method == "GET" and len(parts) == 2 and parts[1] in store:
            return web.json_response(store[parts[1]])
        return web.json_response({"error": "not found"}, status=404)

    return app


def config(up: Upstream, **route_extra: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": up.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json", "reload_interval": 0}},
        "routes": [
            {
                "match": {"methods": ["GET"], "path": "/users"},
                "key": "app",
                "response": {
                    "decrypt": [
                        {"path": "$[*].ssn", "bind_as": "$.ssn"},
                        {"path": "$[*].card.number", "bind_as": "$.card.number"},
                        {"path": "$[*].contacts[*].phone", "bind_as": "$.contacts[*].phone"},
                    ]
                },
                **route_extra,
            },
            {
                "match": {"methods": ["POST", "PUT", "GET"], "path": "/users/**"},
                "key": "app",
                "request": {"encrypt": FIELDS},
                "response": {"decrypt": FIELDS},
                **route_extra,
            },
        ],
    }


class Recorder:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    @hookimpl
    def sidecrypt_audit(self, event: AuditEvent) -> None:
        self.events.append(event)


Env = tuple[RunningProxy, Upstream, dict[str, Any], aiohttp.ClientSession, Path]


@pytest.fixture
async def env(certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any) -> Any:
    keyring = make_keyring(tmp_path)
    store: dict[str, Any] = {}
    up = await upstream_factory(store_app(store))
    proxy = await proxy_factory(config(up), base_dir=tmp_path)
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        yield proxy, up, store, client, keyring


def assert_no_canary(up: Upstream) -> None:
    seen = up.all_bytes()
    assert seen, "the upstream saw nothing at all"
    for needle in (CANARY, json.dumps(CANARY)[1:-1]):
        assert needle.encode() not in seen
    assert "☎".encode() not in seen and b"\\u260e" not in seen.lower()


def tokens_of(record: dict[str, Any]) -> list[str]:
    out = [record["ssn"], record["card"]["number"]]
    out += [c["phone"] for c in record.get("contacts", [])]
    return out


async def test_fields_reach_upstream_only_as_tokens_and_read_back_with_types(env: Env) -> None:
    proxy, up, store, client, _ = env
    ids = []
    for record in RECORDS:
        async with client.post(f"{proxy.url}/users", json=record) as resp:
            assert resp.status == 201, await resp.text()
            body = await resp.json()
            ids.append(body.pop("id"))
            assert strict(body) == strict(record)  # the create echo is decrypted too
    assert_no_canary(up)
    for key, record in zip(ids, RECORDS, strict=True):
        stored = store[key]
        for token in tokens_of(stored):
            assert is_envelope(token)
            env_ = parse(token)
            assert (env_.provider, env_.key_name, env_.key_version) == ("local", "app", 1)
        # Fields no rule names are stored exactly as sent.
        assert stored["name"] == record["name"]
        assert [c.get("kind") for c in stored.get("contacts", [])] == [
            c.get("kind") for c in record.get("contacts", [])
        ]
        async with client.get(f"{proxy.url}/users/{key}") as resp:
            assert resp.status == 200
            assert strict(await resp.json()) == strict(record)
    # The list endpoint decrypts every element, each bound under its single-record label.
    async with client.get(f"{proxy.url}/users") as resp:
        assert resp.status == 200
        assert strict(await resp.json()) == strict(RECORDS)


async def test_put_replaces_with_fresh_tokens(env: Env) -> None:
    proxy, up, store, client, _ = env
    async with client.post(f"{proxy.url}/users", json=RECORDS[2]) as resp:
        key = (await resp.json())["id"]
    first = store[key]["ssn"]
    update = {**RECORDS[2], "ssn": f"{CANARY}-new"}
    async with client.put(f"{proxy.url}/users/{key}", json=update) as resp:
        assert resp.status == 200
        assert strict(await resp.json()) == strict(update)
    assert is_envelope(store[key]["ssn"]) and store[key]["ssn"] != first
    assert_no_canary(up)


async def test_token_moved_to_another_field_is_refused(env: Env) -> None:
    proxy, _, store, client, _ = env
    async with client.post(f"{proxy.url}/users", json=RECORDS[0]) as resp:
        key = (await resp.json())["id"]
    record = store[key]
    record["card"]["number"], record["ssn"] = record["ssn"], record["card"]["number"]
    async with client.get(f"{proxy.url}/users/{key}") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["code"] == "decrypt_failed"
    assert CANARY not in json.dumps(body)
    # Moving a token between two elements of the same list keeps its label ($.contacts[*].phone):
    # that is allowed by design; the label binds the field, not the row index.
    async with client.post(f"{proxy.url}/users", json=RECORDS[0]) as resp:
        key2 = (await resp.json())["id"]
    contacts = store[key2]["contacts"]
    contacts[0]["phone"], contacts[3]["phone"] = contacts[3]["phone"], contacts[0]["phone"]
    async with client.get(f"{proxy.url}/users/{key2}") as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got["contacts"][3]["phone"] == RECORDS[0]["contacts"][0]["phone"]


async def test_rotation_while_running(
    certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any
) -> None:
    keyring = make_keyring(tmp_path)
    store: dict[str, Any] = {}
    up = await upstream_factory(store_app(store))
    raw = config(up)
    raw["data_keys"] = {"max_uses": 1}  # every field gets a fresh data key: no cached v1 key
    proxy = await proxy_factory(raw, base_dir=tmp_path)
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.post(f"{proxy.url}/users", json=RECORDS[0]) as resp:
            old = (await resp.json())["id"]
        assert {parse(t).key_version for t in tokens_of(store[old])} == {1}
        info = rotate_key(keyring, "app")
        assert info["version"] == 2
        assert stat.S_IMODE(keyring.stat().st_mode) == 0o600
        async with client.post(f"{proxy.url}/users", json=RECORDS[1]) as resp:
            new = (await resp.json())["id"]
        assert {parse(t).key_version for t in tokens_of(store[new])} == {2}
        for key, record in ((old, RECORDS[0]), (new, RECORDS[1])):
            async with client.get(f"{proxy.url}/users/{key}") as resp:
                assert resp.status == 200
                assert strict(await resp.json()) == strict(record)
    assert_no_canary(up)


def context_config(up: Upstream, on_error: str) -> dict[str, Any]:
    return {
        "upstream": {"url": up.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json"}},
        "routes": [
            {
                "match": {"path": "/users/**"},
                "key": "app",
                "context": {"tenant": "header:X-Tenant", "app": "crm"},
                "request": {"encrypt": FIELDS},
                "response": {"decrypt": FIELDS},
                "on_decrypt_error": on_error,
            }
        ],
    }


@pytest.mark.parametrize("on_error", ["error", "ciphertext"])
async def test_context_binding_across_tenants(
    certs: Certs,
    tmp_path: Path,
    upstream_factory: Any,
    proxy_factory: Any,
    on_error: str,
) -> None:
    make_keyring(tmp_path)
    store: dict[str, Any] = {}
    up = await upstream_factory(store_app(store))
    proxy = await proxy_factory(context_config(up, on_error), base_dir=tmp_path)
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.post(
            f"{proxy.url}/users", json=RECORDS[0], headers={"X-Tenant": "acme"}
        ) as resp:
            assert resp.status == 201
            key = (await resp.json())["id"]
        stored = store[key]
        assert parse(stored["ssn"]).context == (("app", "crm"), ("tenant", "acme"))
        async with client.get(f"{proxy.url}/users/{key}", headers={"X-Tenant": "acme"}) as resp:
            assert strict(await resp.json()) == strict(RECORDS[0])
        async with client.get(f"{proxy.url}/users/{key}", headers={"X-Tenant": "evil"}) as resp:
            text = await resp.text()
            status = resp.status
    assert CANARY not in text and "☎" not in text
    if on_error == "error":
        assert status == 502
        assert json.loads(text)["error"]["code"] == "context_mismatch"
    else:
        assert status == 200
        assert json.loads(text) == stored  # every token passed through untouched
    assert_no_canary(up)


async def test_no_secret_in_logs_or_audit_across_a_full_cycle(
    certs: Certs,
    tmp_path: Path,
    upstream_factory: Any,
    proxy_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    make_keyring(tmp_path)
    store: dict[str, Any] = {}
    up = await upstream_factory(store_app(store))
    recorder = Recorder()
    raw = context_config(up, "error")
    raw["server"] = {"access_log": True}
    raw["log"] = {"level": "debug"}
    proxy = await proxy_factory(raw, base_dir=tmp_path, plugins=(recorder,))
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    tenant = {"X-Tenant": "acme"}
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.post(f"{proxy.url}/users", json=RECORDS[0], headers=tenant) as resp:
            key = (await resp.json())["id"]
        async with client.get(f"{proxy.url}/users/{key}", headers=tenant) as resp:
            assert resp.status == 200
        async with client.get(f"{proxy.url}/users/{key}", headers={"X-Tenant": "x"}) as resp:
            assert resp.status == 502
        # Tampered token, malformed JSON carrying the canary, and a missing context header.
        ssn = store[key]["ssn"]
        store[key]["ssn"] = ssn[:40] + ("A" if ssn[40] != "A" else "B") + ssn[41:]
        async with client.get(f"{proxy.url}/users/{key}", headers=tenant) as resp:
            assert resp.status == 502
        bad = b'{"ssn": "' + CANARY.encode() + b'", '
        async with client.post(
            f"{proxy.url}/users",
            data=bad,
            headers={**tenant, "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 400
        async with client.post(f"{proxy.url}/users", json=RECORDS[0]) as resp:
            assert resp.status == 400
    assert recorder.events, "the audit hook saw no key use"
    assert {"encrypt_fields", "decrypt_fields"} <= {e.action for e in recorder.events}
    for event in recorder.events:
        assert CANARY not in repr(event)
    assert caplog.records, "nothing was logged"
    for record in caplog.records:
        dumped = record.getMessage() + repr(record.__dict__)
        assert CANARY not in dumped and "☎" not in dumped
        assert "123-45-6789" not in dumped
