"""The same GET through sidecrypt gives each mTLS caller exactly the view its policy grants.

Real sockets, real TLS with client certificates from trustme, a real keyring and upstream; the
audit trail (through the ``sidecrypt_audit`` hook) says who saw what and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.conftest import Certs

from sidecrypt import hookimpl
from sidecrypt.envelope import is_envelope
from sidecrypt.events import AuditEvent
from sidecrypt.keyring import create_key

SSN = "123-45-6789"
CARD = "4111111111111111"
RECORD = {"id": 7, "name": "Ada", "ssn": SSN, "card": {"number": CARD, "exp": "12/30"}}


class Recorder:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    @hookimpl
    def sidecrypt_audit(self, event: AuditEvent) -> None:
        self.events.append(event)


@pytest.fixture
async def setup(
    certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any
) -> tuple[Any, Recorder, Any]:
    create_key(tmp_path / "keyring.json", "app")
    stored: dict[str, bytes] = {}

    async def app(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.method == "PUT":
            stored[request.path] = body
            return web.json_response({"stored": True})
        return web.Response(body=stored[request.path], content_type="application/json")

    up = await upstream_factory(app)
    recorder = Recorder()
    fields = ["$.ssn", "$.card.number"]
    proxy = await proxy_factory(
        {
            "upstream": {"url": up.url},
            "listen": {
                "tls": {
                    "cert": str(certs.server_cert),
                    "key": str(certs.server_key),
                    "client_ca": str(certs.ca_file),
                }
            },
            "keys": {"app": {"provider": "local", "keyring": "keyring.json", "key": "app"}},
            "identity": {
                "mtls": {
                    "id_from": ["cn"],
                    "map": [
                        {"cn": "billing-*", "roles": ["billing"]},
                        {"cn": "support-*", "roles": ["support"]},
                        {"cn": "batch", "roles": ["batch"]},
                    ],
                }
            },
            "policy": {
                "rules": [
                    {
                        "key": "app",
                        "route": "/users/*",
                        "fields": fields,
                        "roles": ["mtls:billing"],
                        "purposes": ["invoicing"],
                        "mask_for": {"roles": ["support"]},
                        "ciphertext_for": {"roles": ["batch"]},
                        "otherwise": "deny",
                    }
                ]
            },
            "routes": [
                {
                    "match": {"methods": ["PUT", "GET"], "path": "/users/*"},
                    "key": "app",
                    "request": {"encrypt": fields},
                    "response": {"decrypt": fields},
                }
            ],
        },
        plugins=(recorder,),
        base_dir=tmp_path,
    )

    def client_for(cn: str) -> aiohttp.ClientSession:
        ctx = certs.client_context(client=certs.issue_client(cn))
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))

    async with client_for("billing-1") as writer:
        resp = await writer.put(f"{proxy.url}/users/7", json=RECORD)
        assert resp.status == 200, await resp.text()
    stored_doc = stored["/users/7"]
    assert SSN.encode() not in stored_doc and CARD.encode() not in stored_doc
    return proxy, recorder, client_for


async def get_as(setup: Any, cn: str, purpose: str | None = None) -> tuple[int, Any]:
    proxy, _, client_for = setup
    headers = {"X-Purpose": purpose} if purpose else {}
    async with client_for(cn) as session:
        resp = await session.get(f"{proxy.url}/users/7", headers=headers)
        return resp.status, await resp.json()


async def test_each_caller_gets_exactly_its_view(setup: Any) -> None:
    status, doc = await get_as(setup, "billing-1", purpose="invoicing")
    assert status == 200 and doc == RECORD

    status, doc = await get_as(setup, "support-7")
    assert status == 200
    assert doc["name"] == "Ada" and doc["ssn"] != SSN and doc["ssn"].endswith("6789")
    assert doc["card"]["number"].endswith("1111") and CARD not in doc["card"]["number"]

    status, doc = await get_as(setup, "batch")
    assert status == 200 and doc["name"] == "Ada"
    assert is_envelope(doc["ssn"]) and is_envelope(doc["card"]["number"])

    status, doc = await get_as(setup, "stranger")
    assert status == 403 and SSN not in str(doc) and CARD not in str(doc)

    status, _ = await get_as(setup, "billing-1")  # no declared purpose: not a reveal
    assert status == 403


async def test_audit_trail_shows_who_saw_what_and_why(setup: Any) -> None:
    _, recorder, _ = setup
    await get_as(setup, "billing-1", purpose="invoicing")
    await get_as(setup, "support-7")
    await get_as(setup, "stranger")
    reveals = [e for e in recorder.events if e.action == "reveal"]
    seen = {(e.principal, e.outcome, e.purpose, frozenset(e.fields)) for e in reveals}
    both = frozenset({"$.ssn", "$.card.number"})
    assert ("mtls:billing-1", "revealed", "invoicing", both) in seen
    assert ("mtls:support-7", "masked", None, both) in seen
    denied = [e for e in recorder.events if e.outcome == "denied"]
    assert denied and all("stranger" in (e.principal or "") for e in denied)
    for event in recorder.events:
        assert SSN not in repr(event.to_dict()) and CARD not in repr(event.to_dict())
