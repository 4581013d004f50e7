"""Detokenizing under the reveal policy, end to end: each caller (trusted-header identity)
gets the value, its masked form, the token itself (``ciphertext``), no field (``drop``) or a
403 (``deny``), and the audit trail says so without a value. A tampered vault row is a 502."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecrypt import hookimpl
from sidecrypt.events import AuditEvent
from sidecrypt.keyring import create_key

SSN = "123-45-6789"
CARD = "4111 1111 1111 1111"
RECORD = {"id": 7, "name": "Ada", "ssn": SSN, "card": CARD}
RULES = [
    {"path": "$.ssn", "format": "ssn", "consistent": True},
    {"path": "$.card", "format": "card"},
]


class Recorder:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    @hookimpl
    def sidecrypt_audit(self, event: AuditEvent) -> None:
        self.events.append(event)


@pytest.fixture
async def setup(tmp_path: Path, upstream_factory: Any, proxy_factory: Any) -> Any:
    create_key(tmp_path / "keyring.json", "app")
    stored: dict[str, bytes] = {}

    async def app(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.method == "PUT":
            stored[request.path] = body
            return web.json_response({"stored": True})
        return web.Response(body=stored[request.path], content_type="application/json")

    up = await upstream_factory(app)
    recorder = Recorder()
    proxy = await proxy_factory(
        {
            "upstream": {"url": up.url},
            "keys": {"app": {"provider": "local", "keyring": "keyring.json", "key": "app"}},
            "stores": {"vault": {"type": "sqlite", "path": "vault.db"}},
            "tokens": {"cache_entries": 0},  # every read goes to the vault (tamper test)
            "identity": {"header": {"trusted_cidrs": ["127.0.0.1/32"]}},
            "policy": {
                "rules": [
                    {
                        "key": "app",
                        "route": "/records/*",
                        "fields": ["$.ssn", "$.card"],
                        "roles": ["header:billing"],
                        "mask_for": {"roles": ["header:support"]},
                        "ciphertext_for": {"roles": ["header:batch"]},
                        "drop_for": {"roles": ["header:audit"]},
                        "otherwise": "deny",
                    }
                ]
            },
            "routes": [
                {
                    "match": {"methods": ["PUT", "GET"], "path": "/records/*"},
                    "key": "app",
                    "context": {"tenant": "header:X-Tenant"},
                    "request": {"tokenize": RULES},
                    "response": {"detokenize": RULES},
                }
            ],
        },
        tls=False,
        plugins=(recorder,),
        base_dir=tmp_path,
    )
    async with aiohttp.ClientSession() as http:
        headers = {"X-Tenant": "acme", "X-Sidecrypt-Principal": "w", "X-Sidecrypt-Roles": "billing"}
        async with http.put(f"{proxy.url}/records/7", json=RECORD, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    return proxy, recorder, stored, tmp_path


async def _get(proxy: Any, role: str | None) -> tuple[int, Any]:
    headers = {"X-Tenant": "acme"}
    if role:
        headers |= {"X-Sidecrypt-Principal": f"{role}-1", "X-Sidecrypt-Roles": role}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{proxy.url}/records/7", headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_each_caller_gets_its_view(setup: Any) -> None:
    proxy, recorder, stored, _ = setup
    app_doc = json.loads(stored["/records/7"])
    assert app_doc["ssn"] != SSN and len(app_doc["ssn"]) == 11
    assert await _get(proxy, "billing") == (200, RECORD)
    status, doc = await _get(proxy, "support")
    assert (
        status == 200
        and doc["ssn"].endswith("6789")
        and "*" in doc["ssn"]
        and doc["card"].endswith("1111")
    )
    assert SSN not in json.dumps(doc) and CARD not in json.dumps(doc)
    assert await _get(proxy, "batch") == (200, app_doc)  # ciphertext: the token itself
    assert await _get(proxy, "audit") == (200, {"id": 7, "name": "Ada"})
    status, doc = await _get(proxy, None)
    assert status == 403 and doc["error"]["code"] == "forbidden"
    outcomes = {e.outcome for e in recorder.events if e.action == "reveal"}
    assert {"revealed", "masked", "ciphertext", "dropped"} <= outcomes
    assert any(e.action == "request_failed" and e.outcome == "denied" for e in recorder.events)
    actions = {e.action for e in recorder.events}
    assert {"tokenize_fields", "detokenize_fields"} <= actions
    assert all(SSN not in repr(e) and "4111 1111" not in repr(e) for e in recorder.events)


async def test_a_tampered_vault_row_is_a_502(setup: Any) -> None:
    proxy, _, _, tmp_path = setup
    db = sqlite3.connect(tmp_path / "vault.db")
    try:
        rows = db.execute("SELECT token, sealed FROM token_vault").fetchall()
        (t1, s1), (t2, s2) = rows
        db.execute("UPDATE token_vault SET sealed=? WHERE token=?", (s2, t1))  # moved
        db.execute("UPDATE token_vault SET sealed=? WHERE token=?", (s1, t2))
        db.commit()
    finally:
        db.close()
    status, doc = await _get(proxy, "billing")
    assert status == 502 and doc["error"]["code"] == "vault_tampered"
    assert SSN not in str(doc) and "4111" not in str(doc)
