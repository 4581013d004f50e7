"""Per-tenant branch keys through a running proxy (local keyring, sqlite store): a tenant's
token read with another tenant's context fails closed; ``sidecrypt keys forget --branch
tenant=acme`` makes every acme field unreadable (502, nothing revealed) while other tenants
still decrypt; rotate and forget are recorded in the audit trail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecrypt import cli, keyring

Factory = Callable[..., Awaitable[Any]]


def _raw(ring: Path, upstream: str, **extra: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream},
        "stores": {"main": {"type": "sqlite", "path": "store.db"}},
        "keys": {
            "app": {
                "provider": "local",
                "keyring": str(ring),
                "hierarchy": {"store": "main", "per": "tenant", "refresh": 0.3},
            }
        },
        "routes": [
            {
                "match": {"methods": ["POST", "GET"], "path": "/users/**"},
                "key": "app",
                "context": {"tenant": "header:X-Tenant"},
                "request": {"encrypt": ["$.ssn"]},
                "response": {"decrypt": ["$.ssn"]},
            }
        ],
        **extra,
    }


async def test_forget_shreds_one_tenant_only(
    tmp_path: Path, upstream_factory: Factory, proxy_factory: Factory
) -> None:
    stored: dict[str, bytes] = {}

    async def users(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.method == "POST":
            stored[request.path] = body
            return web.json_response({"ok": True})
        return web.Response(body=stored[request.path], content_type="application/json")

    up = await upstream_factory(users)
    ring = tmp_path / "keyring.json"
    keyring.create_key(ring, "app")
    raw = _raw(ring, up.url)
    (tmp_path / "sidecrypt.yaml").write_text(yaml.safe_dump(raw))
    proxy = await proxy_factory(raw, tls=False, base_dir=tmp_path)
    async with aiohttp.ClientSession() as session:

        async def call(method: str, path: str, tenant: str, **kw: Any) -> tuple[int, Any]:
            async with session.request(
                method, f"{proxy.url}{path}", headers={"X-Tenant": tenant}, **kw
            ) as resp:
                return resp.status, await resp.json()

        assert (await call("POST", "/users/1", "acme", json={"ssn": "ACME-CANARY"}))[0] == 200
        assert (await call("POST", "/users/2", "other", json={"ssn": "OTHER-CANARY"}))[0] == 200
        assert b"CANARY" not in b"".join(stored.values())
        assert await call("GET", "/users/1", "acme") == (200, {"ssn": "ACME-CANARY"})
        status, body = await call("GET", "/users/1", "other")  # acme's token, other's context
        assert status == 502 and "CANARY" not in json.dumps(body)

        code = await asyncio.to_thread(
            cli.main,
            [
                "keys",
                "forget",
                "--config",
                str(tmp_path / "sidecrypt.yaml"),
                "--branch",
                "tenant=acme",
            ],
        )
        assert code == 0
        for _ in range(100):  # the running proxy sees it within hierarchy.refresh
            status, body = await call("GET", "/users/1", "acme")
            if status != 200:
                break
            await asyncio.sleep(0.05)
        assert status == 502, body
        assert body["error"]["code"] == "branch_key_unknown"
        assert "CANARY" not in json.dumps(body)
        assert await call("GET", "/users/2", "other") == (200, {"ssn": "OTHER-CANARY"})
        async with session.get(f"{proxy.admin_url}/metrics") as resp:
            text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    created = samples[("sidecrypt_branch_key_cache_total", (("key", "app"), ("result", "created")))]
    assert created == 2  # one branch per tenant
    assert (
        samples[("sidecrypt_branch_key_cache_total", (("key", "app"), ("result", "unknown")))] >= 1
    )
    ops = {dict(k[1]).get("operation") for k in samples if k[0] == "sidecrypt_store_calls_total"}
    assert {"branch_keys.insert", "branch_keys.get", "branch_keys.latest"} <= ops
    assert "CANARY" not in text


def test_rotate_and_forget_are_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ring = tmp_path / "keyring.json"
    keyring.create_key(ring, "app")
    monkeypatch.setenv("AUDIT_KEY", "k" * 32)
    trail = tmp_path / "audit.jsonl"
    raw = _raw(
        ring,
        "http://127.0.0.1:9",
        audit={"file": str(trail), "hmac_key": {"env": "AUDIT_KEY"}},
    )
    path = tmp_path / "sidecrypt.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert (
        cli.main(["keys", "rotate", "--config", str(path), "app", "--branch", "tenant=acme"]) == 0
    )
    assert json.loads(capsys.readouterr().out) == [
        {"name": "app", "branch": "tenant=acme", "version": 1}
    ]
    assert cli.main(["keys", "rotate", "--config", str(path), "app"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["version"] == 2
    assert cli.main(["keys", "forget", "--config", str(path), "--branch", "tenant=acme"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": "app", "branch": "tenant=acme", "versions_deleted": 2}
    ]
    assert cli.main(["keys", "forget", "--config", str(path), "--branch", "region=eu"]) == 2
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    events = [r.get("event", r) for r in records]
    actions = [(e.get("action"), e.get("context"), e.get("count")) for e in events if "action" in e]
    assert ("branch_key_rotate", {"tenant": "acme"}, None) in [(a, c, None) for a, c, _ in actions]
    assert ("branch_key_forget", {"tenant": "acme"}, 2) in actions


def test_rewrap_reports_what_protects_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ring = tmp_path / "keyring.json"
    keyring.create_key(ring, "app")
    plain = {**_raw(ring, "http://127.0.0.1:9"), "stores": {}}
    plain["keys"] = {"app": {"provider": "local", "keyring": str(ring)}}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    branched = _raw(ring, "http://127.0.0.1:9")
    branched["keys"]["app"]["hierarchy"].pop("per")
    (tmp_path / "branched.yaml").write_text(yaml.safe_dump(branched))
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps({"ssn": "REWRAP-CANARY"}))
    assert (
        cli.main(
            [
                "encrypt",
                "--config",
                str(tmp_path / "plain.yaml"),
                "--field",
                "$.ssn",
                "--key",
                "app",
                str(doc),
            ]
        )
        == 0
    )
    doc.write_text(capsys.readouterr().out)
    args = [
        "rewrap",
        "--config",
        str(tmp_path / "branched.yaml"),
        "--field",
        "$.ssn",
        "--to-key",
        "app",
    ]
    assert cli.main([*args, str(doc)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.err.splitlines()[-2]) == {"protected_by": {"local app:1": 1}}
    doc.write_text(captured.out)
    assert cli.main([*args, str(doc)]) == 0
    captured = capsys.readouterr()
    (label,) = json.loads(captured.err.splitlines()[-2])["protected_by"]
    assert label.startswith("local.bk app:1 branch=")
    assert "REWRAP-CANARY" not in captured.out + captured.err
