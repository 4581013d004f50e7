"""The access log (``server.access_log``): one structured line per request on either engine,
with the route's label, status, duration, sizes, request id and caller; never a value, a path or
a query string."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecrypt.keyring import create_key

CANARY = "CANARY-ssn-5521"


@pytest.mark.parametrize("engine", ["lean", "aiohttp"])
async def test_one_line_per_request_without_values(
    engine: str,
    tmp_path: Path,
    upstream: Any,
    proxy_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    create_key(tmp_path / "keyring.json", "app")
    raw = {
        "server": {"access_log": True, "engine": engine},
        "upstream": {"url": upstream.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json"}},
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/users/**"},
                "key": "app",
                "request": {"encrypt": ["$.ssn"]},
            }
        ],
    }
    proxy = await proxy_factory(raw, tls=False, base_dir=tmp_path)
    caplog.set_level(logging.INFO, logger="sidecrypt.access")
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{proxy.url}/users/1?note={CANARY}",
            json={"ssn": CANARY},
            headers={"X-Request-Id": "req-42"},
        ) as resp:
            assert resp.status == 200
        async with session.get(f"{proxy.url}/plain/{CANARY}") as resp:
            assert resp.status == 200
    lines = [r for r in caplog.records if r.name == "sidecrypt.access"]
    assert len(lines) == 2
    first, second = (vars(r) for r in lines)
    assert first["method"] == "POST" and first["route"] == "POST /users/**"
    assert first["status"] == 200 and first["request_id"] == "req-42"
    assert first["request_bytes"] > 0 and first["response_bytes"] > 0
    assert first["duration_ms"] >= 0
    assert second["route"] == "unmatched" and second["method"] == "GET"
    for record in lines:
        assert CANARY not in record.getMessage() + repr(vars(record))


async def test_off_by_default(
    upstream: Any, proxy_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await proxy_factory({"upstream": {"url": upstream.url}}, tls=False)
    caplog.set_level(logging.INFO, logger="sidecrypt.access")
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/x") as resp:
        assert resp.status == 200
    assert not [r for r in caplog.records if r.name == "sidecrypt.access"]
