"""Offline transforms (offline.py) bind the context the proxy would: a backfill reads back.

Encrypt offline, store the result directly in the app (no proxy), read it back through the
proxy: routes with literal, header, path and query context entries. Also the usage errors for a
source the command line does not give, and the CLI flags that give them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.conftest import Certs

from sidecrypt.errors import ConfigError, CryptoError
from sidecrypt.keyring import create_key
from sidecrypt.offline import rewrap_document, transform_document

SSN = "CANARY-123-45-6789"
ROUTES = {
    "lit": {"app": "records"},
    "hdr": {"app": "records", "tenant": "header:X-Tenant"},
    "path": {"app": "records", "id": "path:id"},
    "qry": {"region": "query:region"},
}


def _config(upstream_url: str) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream_url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json", "reload_interval": 0}},
        "routes": [
            {
                "match": {"methods": ["POST", "GET"], "path": f"/{name}/{{id}}"},
                "key": "app",
                "context": ctx,
                "request": {"encrypt": ["$.ssn"]},
                "response": {"decrypt": ["$.ssn"]},
            }
            for name, ctx in ROUTES.items()
        ],
    }


@pytest.fixture
async def backfill(tmp_path: Path, upstream_factory: Any, proxy_factory: Any, certs: Certs) -> Any:
    create_key(tmp_path / "keyring.json", "app")
    store: dict[str, bytes] = {}

    async def app(request: web.Request, body: bytes) -> web.Response:
        if request.path not in store:
            return web.json_response({"error": "not found"}, status=404)
        return web.Response(body=store[request.path], content_type="application/json")

    up = await upstream_factory(app)
    proxy = await proxy_factory(_config(up.url), base_dir=tmp_path)
    return proxy, store


@pytest.mark.parametrize(
    ("path", "offline", "read"),
    [
        ("/lit/1", {}, {}),
        ("/hdr/1", {"headers": {"x-tenant": "t1"}}, {"headers": {"X-Tenant": "t1"}}),
        # the case: --context names the entry; the literal app=records is bound too
        ("/hdr/2", {"context": {"tenant": "t1"}}, {"headers": {"X-Tenant": "t1"}}),
        ("/path/7", {}, {}),  # the id comes from the --route target, as from the request
        ("/qry/1?region=eu", {}, {"params": {"region": "eu"}}),
        ("/qry/2", {"query": {"region": "eu"}}, {"params": {"region": "eu"}}),
    ],
)
async def test_backfilled_record_reads_back_through_the_proxy(
    backfill: Any, certs: Certs, path: str, offline: dict[str, Any], read: dict[str, Any]
) -> None:
    proxy, store = backfill
    doc = json.dumps({"ssn": SSN, "name": "Ada"}).encode()
    sealed = await transform_document(
        proxy.settings, doc, direction="encrypt", route=f"POST {path}", **offline
    )
    assert SSN.encode() not in sealed
    store[path.partition("?")[0]] = sealed  # straight into the app's storage
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.url + path.partition("?")[0], ssl=certs.client_context(), **read) as r,
    ):
        body = await r.json()
        assert r.status == 200, body
    assert body == {"ssn": SSN, "name": "Ada"}
    opened = await transform_document(
        proxy.settings, sealed, direction="decrypt", route=f"GET {path}", **offline
    )
    assert json.loads(opened) == {"ssn": SSN, "name": "Ada"}


@pytest.mark.parametrize(
    ("route", "kwargs", "words"),
    [
        ("POST /hdr/1", {}, ["'tenant'", "X-Tenant", "--header X-Tenant=VALUE"]),
        ("POST /qry/1", {}, ["'region'", "--query region=VALUE"]),
        ("POST /hdr/1", {"context": {"region": "eu"}}, ["no context entry 'region'"]),
        ("POST /lit/1", {"context": {"app": "other"}}, ["fixes this entry"]),
        ("POST", {}, ["--route wants 'METHOD /path'"]),
    ],
)
async def test_a_context_source_not_given_is_a_usage_error(
    backfill: Any, route: str, kwargs: dict[str, Any], words: list[str]
) -> None:
    proxy, _ = backfill
    with pytest.raises(ConfigError) as err:
        await transform_document(
            proxy.settings, b'{"ssn": "x"}', direction="encrypt", route=route, **kwargs
        )
    for word in words:
        assert word in err.value.message


async def test_rewrap_with_a_route_checks_the_route_context(backfill: Any) -> None:
    proxy, _ = backfill
    settings = proxy.settings
    sealed = await transform_document(
        settings,
        b'{"ssn": "x"}',
        direction="encrypt",
        route="POST /hdr/1",
        headers={"X-Tenant": "t1"},
    )
    out, moved = await rewrap_document(
        settings, sealed, to_key="app", route="POST /hdr/1", headers={"X-Tenant": "t1"}
    )
    assert [m[0] for m in moved] == ["$.ssn"] and out != sealed
    with pytest.raises(CryptoError) as err:  # not the context the proxy would read it under
        await rewrap_document(
            settings, sealed, to_key="app", route="POST /hdr/1", headers={"X-Tenant": "t2"}
        )
    assert err.value.code == "context_mismatch"
    with pytest.raises(ConfigError):
        await rewrap_document(settings, sealed, to_key="app", route="POST /hdr/1")


def test_cli_header_and_query_flags(tmp_path: Path) -> None:
    create_key(tmp_path / "keyring.json", "app")
    import yaml

    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(_config("http://127.0.0.1:9")))

    def run(*args: str, stdin: bytes = b'{"ssn": "x"}') -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "sidecrypt.cli", *args, "--config", str(cfg)],
            input=stdin,
            capture_output=True,
            timeout=60,
            check=False,
        )

    ok = run("encrypt", "--route", "POST /hdr/1", "--header", "X-Tenant=t1")
    assert ok.returncode == 0, ok.stderr
    back = run("decrypt", "--route", "GET /hdr/1", "--header", "X-Tenant=t1", stdin=ok.stdout)
    assert back.returncode == 0 and json.loads(back.stdout) == {"ssn": "x"}, back.stderr
    missing = run("encrypt", "--route", "POST /hdr/1")
    assert missing.returncode == 2 and b"X-Tenant" in missing.stderr
    bad = run("encrypt", "--route", "POST /qry/1", "--query", "region")
    assert bad.returncode == 2 and b"NAME=VALUE" in bad.stderr
    assert b"Traceback" not in missing.stderr + bad.stderr
