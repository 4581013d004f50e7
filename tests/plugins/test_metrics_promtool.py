"""The /metrics exposition follows Prometheus's conventions: `promtool check metrics` finds no
problem in it after real traffic, the usual runtime series are there, and the Grafana
dashboard's queries parse and name real series."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecrypt import __version__
from sidecrypt.keyring import create_key


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (.ci/run installs Debian's prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


async def test_exposition_passes_promtool(
    tmp_path: Path, upstream: Any, proxy_factory: Any, certs: Any
) -> None:
    create_key(tmp_path / "keyring.json", "app")
    raw = {
        "upstream": {"url": upstream.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json"}},
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/users/**"},
                "key": "app",
                "request": {"encrypt": ["$.ssn"]},
                "response": {"decrypt": ["$.ssn"]},
            }
        ],
    }
    proxy = await proxy_factory(raw, base_dir=tmp_path)
    ssl = certs.client_context()
    async with aiohttp.ClientSession() as session:
        for body in ({"ssn": "123-45-6789"}, "not json"):
            data = body if isinstance(body, str) else None
            async with session.post(
                f"{proxy.url}/users/1",
                json=None if data else body,
                data=data,
                headers={"Content-Type": "application/json"},
                ssl=ssl,
            ) as resp:
                await resp.read()
        async with session.get(f"{proxy.url}/plain", ssl=ssl) as resp:
            await resp.read()
        async with session.get(f"{proxy.admin_url}/metrics") as resp:
            assert resp.status == 200
            exposition = await resp.read()
    assert b"sidecrypt_" in exposition
    result = subprocess.run(
        [promtool(), "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=60,
    )
    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and not problems.strip(), problems


DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sidecrypt-dashboard.json"
SRC = Path(__file__).resolve().parents[2] / "src" / "sidecrypt"


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_dashboard_queries_parse_and_name_real_metrics(tmp_path: Path) -> None:
    """Each panel's PromQL parses (promtool check rules) and names a metric sidecrypt exports."""
    exprs = [e.replace("$__rate_interval", "5m").replace("$job", ".*") for e in dashboard_exprs()]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    exported = set()
    for module in SRC.rglob("*.py"):
        exported |= set(re.findall(r'"(sidecrypt_[a-z_]+)"', module.read_text()))
    suffixes = ("_total", "_bucket", "_sum", "_count", "_created")
    for name in {n for e in exprs for n in re.findall(r"sidecrypt_[a-z_]+", e)}:
        base = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
        assert name in exported or base in exported, name


async def test_runtime_series_follow_the_conventions(
    upstream_factory: Any, proxy_factory: Any
) -> None:
    """process_*, python_*, build info, and live gauges: a request held by the upstream is in
    flight and holds one pooled connection; once answered, neither is."""
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        arrived.set()
        await asyncio.wait_for(release.wait(), 10)
        return web.Response(text="ok")

    up = await upstream_factory(slow)
    proxy = await proxy_factory({"upstream": {"url": up.url}}, tls=False)

    async def scrape(session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(f"{proxy.admin_url}/metrics") as resp:
            text = await resp.text()
        return {
            s.name + repr(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    async with aiohttp.ClientSession() as session:
        held = asyncio.ensure_future(session.get(f"{proxy.url}/slow"))
        await asyncio.wait_for(arrived.wait(), 10)
        during = await scrape(session)
        release.set()
        async with await held as resp:
            assert resp.status == 200
        after = await scrape(session)
    assert during["sidecrypt_requests_in_flight[]"] == 1
    assert during["sidecrypt_upstream_connections[('state', 'in_use')]"] == 1
    assert after["sidecrypt_requests_in_flight[]"] == 0
    assert after["sidecrypt_upstream_connections[('state', 'in_use')]"] == 0
    assert after["sidecrypt_upstream_connections[('state', 'idle')]"] == 1
    version = f"[('python', '{platform.python_version()}'), ('version', '{__version__}')]"
    assert after["sidecrypt_build_info" + version] == 1
    assert any(name.startswith("process_cpu_seconds_total") for name in after)
    assert any(name.startswith("python_info") for name in after)
    assert any(name.startswith("python_gc_objects_collected_total") for name in after)
