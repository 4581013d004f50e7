"""Tokens through the proxy, in front of a legacy app with a typed schema (tests/tokens/
legacy_app.py): writes fit its columns and CHECKs, nothing it stores equals a canary, its own
lookups (by email, by ssn, its unique index) keep working through the sidecar, reads return the
original values and types, a tokenized field sits beside an encrypted one, and a vault that
cannot answer is a 503 with nothing forwarded."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from tests.tokens.legacy_app import LegacyApp

from sidecrypt.envelope import is_envelope
from sidecrypt.keyring import create_key
from sidecrypt.tokens.formats import luhn_valid

SSN = {"format": "ssn", "consistent": True}
EMAIL = {"format": "email", "consistent": True}
PHONE = {"format": "digits", "consistent": True, "min_length": 10}
CARD = {"format": "card"}
TOKENIZE = [
    {"path": "$.ssn", **SSN},
    {"path": "$.email", **EMAIL},
    {"path": "$.phone", **PHONE},
    {"path": "$.card", **CARD},
]
DETOKENIZE = [
    {"path": "$..ssn", **SSN},
    {"path": "$..email", **EMAIL},
    {"path": "$..phone", **PHONE},
    {"path": "$..card", **CARD},
]
SECRET_OUT = [
    {"path": "$.user.secret", "bind_as": "$.secret"},
    {"path": "$.users[*].secret", "bind_as": "$.secret"},
]
PEOPLE = [
    {
        "name": "Ada",
        "ssn": "123-45-6789",
        "email": "ada.canary@example.org",
        "phone": 4420794600,
        "card": "4111 1111 1111 1111",
        "secret": "CANARY-secret-ada",
    },
    {
        "name": "Bob",
        "ssn": "987-65-4321",
        "email": "bob.canary@example.org",
        "phone": 3312345678,
        "card": "5500-0000-0000-0004",
        "secret": "CANARY-secret-bob",
    },
]


def proxy_config(upstream_url: str, tmp_path: Path, store: dict[str, Any]) -> dict[str, Any]:
    keyring = tmp_path / "keyring.json"
    if not keyring.exists():
        create_key(keyring, "app")
    return {
        "upstream": {"url": upstream_url},
        "keys": {"app": {"provider": "local", "keyring": str(keyring), "key": "app"}},
        "stores": {"vault": store},
        "routes": [
            {
                "match": {"methods": ["GET"], "path": "/users/by-ssn/{ssn}"},
                "key": "app",
                "lookup": {"path": {"ssn": SSN}},
                "response": {"detokenize": DETOKENIZE, "decrypt": SECRET_OUT},
            },
            {
                "match": {"path": "/users/**"},
                "key": "app",
                "lookup": {"query": {"email": EMAIL}},
                "request": {"tokenize": TOKENIZE, "encrypt": ["$.secret"]},
                "response": {"detokenize": DETOKENIZE, "decrypt": SECRET_OUT},
            },
        ],
    }


@pytest.fixture
async def legacy(upstream_factory: Any, tmp_path: Path) -> tuple[LegacyApp, Any]:
    app = LegacyApp(tmp_path / "app.db")
    return app, await upstream_factory(app)


async def test_a_typed_legacy_app_keeps_working(
    legacy: tuple[LegacyApp, Any], proxy_factory: Any, tmp_path: Path
) -> None:
    app, upstream = legacy
    store = {"type": "sqlite", "path": str(tmp_path / "vault.db")}
    proxy = await proxy_factory(proxy_config(upstream.url, tmp_path, store), tls=False)
    async with aiohttp.ClientSession() as http:
        for person in PEOPLE:
            async with http.post(f"{proxy.url}/users", json=person) as resp:
                assert resp.status == 201, await resp.text()
        # The app stored only tokens, each fitting its column, and ciphertext for the secret.
        rows = app.rows()
        stored = repr(rows)
        for person in PEOPLE:
            for field in ("ssn", "email", "phone", "card", "secret"):
                assert str(person[field]) not in stored, field
        for row in rows:
            _, _, ssn, email, phone, card, secret = row
            assert len(ssn) == 11 and type(phone) is int and len(str(phone)) == 10
            assert email.endswith("@example.org") and not luhn_valid(
                card.replace(" ", "").replace("-", "")
            )
            assert is_envelope(secret)
        # The unique index on ssn still refuses a duplicate: the same ssn, the same token.
        dup = {**PEOPLE[0], "email": "other.person@example.org", "secret": None}
        async with http.post(f"{proxy.url}/users", json=dup) as resp:
            assert resp.status == 409
        # Reads: original values and types.
        async with http.get(f"{proxy.url}/users/1") as resp:
            body = await resp.json()
            assert "user" in body, body
            user = body["user"]
        assert user == {"id": 1, **PEOPLE[0]}
        async with http.get(f"{proxy.url}/users") as resp:
            users = (await resp.json())["users"]
        assert users == [{"id": i + 1, **p} for i, p in enumerate(PEOPLE)]
        # Lookups by the protected values, through the sidecar.
        async with http.get(f"{proxy.url}/users", params={"email": PEOPLE[1]["email"]}) as resp:
            found = (await resp.json())["users"]
        assert [u["name"] for u in found] == ["Bob"] and found[0]["email"] == PEOPLE[1]["email"]
        async with http.get(f"{proxy.url}/users/by-ssn/{PEOPLE[0]['ssn']}") as resp:
            assert resp.status == 200
            assert (await resp.json())["user"]["name"] == "Ada"
        # An ambiguous spelling of the lookup parameter is refused, not forwarded.
        seen = len(upstream.seen)
        async with http.get(f"{proxy.url}/users?EMAIL={PEOPLE[1]['email']}") as resp:
            assert resp.status == 400
        # A value that does not fit its format is the client's 400, nothing forwarded.
        async with http.post(f"{proxy.url}/users", json={**PEOPLE[0], "ssn": "12-345"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "token_format"
        assert len(upstream.seen) == seen
        # Metrics: vault calls and cache figures, field counts; no value in any label.
        async with http.get(f"{proxy.admin_url}/metrics") as resp:
            metrics = await resp.text()
        assert 'sidecrypt_vault_calls_total{operation="insert",outcome="ok"}' in metrics
        assert "sidecrypt_vault_cache_hits_total" in metrics
        assert 'operation="tokenize"' in metrics and 'operation="detokenize"' in metrics
        for person in PEOPLE:
            assert person["email"] not in metrics and person["ssn"] not in metrics
    everything = upstream.all_bytes()
    for person in PEOPLE:
        for field in ("ssn", "email", "card", "secret"):
            assert str(person[field]).encode() not in everything, field


async def test_vault_down_is_503_and_nothing_is_forwarded(
    legacy: tuple[LegacyApp, Any],
    proxy_factory: Any,
    tmp_path: Path,
    postgres: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, upstream = legacy
    name = f"vault_{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("SIDECRYPT_VAULT_DSN", postgres.create_database(name))
    store = {"type": "postgresql", "dsn": {"env": "SIDECRYPT_VAULT_DSN"}, "auto_migrate": True}
    proxy = await proxy_factory(proxy_config(upstream.url, tmp_path, store), tls=False)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/users", json=PEOPLE[0]) as resp:
            assert resp.status == 201
        admin = await asyncpg.connect(postgres.dsn())
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            seen = len(upstream.seen)
            for _ in range(2):  # a pooled connection may notice the loss on first use
                async with http.post(f"{proxy.url}/users", json=PEOPLE[1]) as resp:
                    assert resp.status == 503, await resp.text()
                    assert resp.headers["Retry-After"].isdigit()
                    assert (await resp.json())["error"]["code"].startswith("store_")
            assert len(upstream.seen) == seen
            async with http.get(f"{proxy.admin_url}/readyz") as resp:
                assert resp.status == 503
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()
    assert os.environ["SIDECRYPT_VAULT_DSN"]
