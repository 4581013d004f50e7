"""``sidecrypt store migrate`` and the stores on ``/readyz``: a real proxy with a sqlite and a
PostgreSQL store, ready while both answer, unready (503, naming the store) when one is not."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from sidecrypt import cli


def _config(tmp_path: Path, upstream_url: str) -> Path:
    path = tmp_path / "sidecrypt.yaml"
    raw = {
        "upstream": {"url": upstream_url},
        "stores": {
            "local": {"type": "sqlite", "path": "local.db", "auto_migrate": False},
            "shared": {"type": "postgresql", "dsn": {"env": "SC_TEST_PG_DSN"}},
        },
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def test_migrate_verb_creates_then_reports_current(
    tmp_path: Path,
    postgres: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SC_TEST_PG_DSN", postgres.create_database(f"c_{uuid.uuid4().hex[:12]}"))
    path = _config(tmp_path, "http://127.0.0.1:9")
    assert cli.main(["store", "migrate", "--config", str(path)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first == {
        "local": {"branch_keys": {"from": 0, "to": 1}, "token_vault": {"from": 0, "to": 1}},
        "shared": {"branch_keys": {"from": 0, "to": 1}, "token_vault": {"from": 0, "to": 1}},
    }
    assert cli.main(["store", "migrate", "--config", str(path), "--store", "shared"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "shared": {"branch_keys": {"from": 1, "to": 1}, "token_vault": {"from": 1, "to": 1}}
    }
    assert cli.main(["store", "migrate", "--config", str(path), "--store", "nope"]) == 2
    assert "no store named 'nope'" in capsys.readouterr().err


async def test_readyz_reports_each_store(
    tmp_path: Path,
    postgres: Any,
    monkeypatch: pytest.MonkeyPatch,
    upstream: Any,
    proxy_factory: Callable[..., Awaitable[Any]],
) -> None:
    db = f"r_{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("SC_TEST_PG_DSN", postgres.create_database(db))
    path = _config(tmp_path, upstream.url)
    assert await asyncio.to_thread(cli.main, ["store", "migrate", "--config", str(path)]) == 0
    proxy = await proxy_factory(yaml.safe_load(path.read_text()), tls=False, base_dir=tmp_path)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.admin_url}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200, body
        assert body["checks"]["store:local"]["ok"] is True
        assert body["checks"]["store:shared"]["ok"] is True
        conn = await asyncpg.connect(postgres.dsn(db))
        try:
            await conn.execute("DROP TABLE schema_version")
        finally:
            await conn.close()
        async with session.get(f"{proxy.admin_url}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503
        assert body["checks"]["store:local"]["ok"] is True
        shared = body["checks"]["store:shared"]
        assert shared["ok"] is False
        assert "sidecrypt store migrate" in shared["error"]
        assert postgres.password not in json.dumps(body)


async def test_proxy_refuses_to_start_on_an_unmigrated_store(
    tmp_path: Path,
    postgres: Any,
    monkeypatch: pytest.MonkeyPatch,
    upstream: Any,
    proxy_factory: Callable[..., Awaitable[Any]],
) -> None:
    from sidecrypt.stores import StoreError

    monkeypatch.setenv("SC_TEST_PG_DSN", postgres.create_database(f"u_{uuid.uuid4().hex[:12]}"))
    path = _config(tmp_path, upstream.url)
    with pytest.raises(StoreError) as info:
        await proxy_factory(yaml.safe_load(path.read_text()), tls=False, base_dir=tmp_path)
    assert info.value.code == "store_schema"


def test_check_config_names_file_and_path_of_store_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    for block, where in (
        (
            {"stores": {"x": {"type": "postgresql", "dsn": "postgresql://u:CANARY@h/db"}}},
            "stores.x.dsn",
        ),
        (
            {
                "keys": {
                    "app": {
                        "provider": "local",
                        "keyring": "k.json",
                        "hierarchy": {"store": "nope"},
                    }
                }
            },
            "keys.app.hierarchy.store",
        ),
    ):
        path.write_text(yaml.safe_dump({"upstream": {"url": "http://127.0.0.1:9"}, **block}))
        assert cli.main(["check-config", "--offline", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: {where}: " in err, err
        assert "CANARY" not in err
