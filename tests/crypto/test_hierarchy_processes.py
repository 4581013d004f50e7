"""Two ``sidecrypt run`` processes sharing one PostgreSQL store, KMS (moto_server) underneath:
they agree on the active branch key version, read each other's tokens, and a ``sidecrypt keys
rotate --config`` under load reaches both with no failed request, old versions still
decrypting and new writes using the new version."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from cold_list import FIELDS, RecordsApp, proxy_config
from kms_server import KmsServer
from sidecrypt import envelope

pytestmark = pytest.mark.usefixtures("aws_env")
SIDECRYPT = [sys.executable, "-m", "sidecrypt.cli"]


@contextlib.contextmanager
def run_sidecrypt(config: Path, log: Path) -> Iterator[str]:
    """``sidecrypt run`` in the background, logs to a file; yields its URL; killed at the end."""
    with (
        log.open("wb") as out,
        subprocess.Popen(
            [*SIDECRYPT, "run", "--config", str(config)], stderr=out, stdout=subprocess.DEVNULL
        ) as proc,
    ):
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                for line in log.read_bytes().splitlines():
                    if b"sidecrypt listening" in line:
                        port = json.loads(line)["addresses"][0][1]
                        yield f"http://127.0.0.1:{port}"
                        return
                if proc.poll() is not None:
                    raise AssertionError(f"sidecrypt exited: {log.read_text()[-2000:]}")
                time.sleep(0.1)
            raise AssertionError("sidecrypt did not start")
        finally:
            proc.kill()
            proc.wait(timeout=20)


def _branch(token: str) -> tuple[str, int]:
    env = envelope.parse(token)
    assert env.provider == "kms.bk"
    return env.wrapped[1:17].hex(), env.key_version


async def test_two_processes_agree_and_rotate_under_load(
    moto: KmsServer, postgres: Any, tmp_path: Path
) -> None:
    moto.fresh_key("alias/app")
    dsn = postgres.create_database(f"p_{uuid.uuid4().hex[:12]}")
    os.environ["SC_PROC_DSN"] = dsn
    app = await RecordsApp().start()
    try:
        raw = proxy_config(
            app.url,
            moto.url,
            hierarchy={"store": "shared", "refresh": 0.5},
            stores={"shared": {"type": "postgresql", "dsn": {"env": "SC_PROC_DSN"}}},
        )
        raw["log"] = {"level": "info"}
        config = tmp_path / "sidecrypt.yaml"
        config.write_text(yaml.safe_dump(raw))
        migrate = await asyncio.to_thread(
            subprocess.run,
            [*SIDECRYPT, "store", "migrate", "--config", str(config)],
            capture_output=True,
            timeout=60,
        )
        assert migrate.returncode == 0, migrate.stderr
        with (
            run_sidecrypt(config, tmp_path / "a.log") as a,
            run_sidecrypt(config, tmp_path / "b.log") as b,
        ):
            async with aiohttp.ClientSession() as session:
                sent: list[dict[str, str]] = []
                failures: list[str] = []

                async def post(url: str, tag: str) -> None:
                    body = {f: f"{f}-{tag}-{len(sent)}" for f in FIELDS}
                    async with session.post(
                        f"{url}/records", json=body, headers={"X-Tenant": "acme"}
                    ) as resp:
                        if resp.status != 201:
                            failures.append(f"POST {resp.status} {await resp.text()}")
                            return
                    sent.append(body)

                async def listed(url: str) -> list[dict[str, Any]]:
                    async with session.get(f"{url}/records", headers={"X-Tenant": "acme"}) as resp:
                        if resp.status != 200:
                            failures.append(f"GET {resp.status} {await resp.text()}")
                            return []
                        return list((await resp.json())["items"])

                await asyncio.gather(*(post(u, "first") for u in (a, b, a, b)))
                versions = {_branch(r["a"]) for r in app.records}
                assert len(versions) == 1, versions  # both processes, one active version
                ((branch_id, first),) = versions
                items = await listed(b)
                assert sorted(map(str, items)) == sorted(map(str, sent))

                stop = asyncio.Event()

                async def load() -> None:
                    while not stop.is_set():
                        await post(a, "load")
                        await post(b, "load")
                        await listed(a if len(sent) % 2 else b)
                        await asyncio.sleep(0.02)

                loader = asyncio.create_task(load())
                try:
                    rotated = await asyncio.to_thread(
                        subprocess.run,
                        [*SIDECRYPT, "keys", "rotate", "--config", str(config), "app"],
                        capture_output=True,
                        timeout=60,
                    )
                    assert rotated.returncode == 0, rotated.stderr
                    assert json.loads(rotated.stdout)[0]["version"] == first + 1
                    deadline = time.monotonic() + 30
                    seen: set[int] = set()
                    while time.monotonic() < deadline:  # new writes from both use version 2
                        count = len(app.records)
                        await asyncio.sleep(0.6)
                        recent = app.records[count:]
                        seen = {_branch(r["a"])[1] for r in recent[-4:]}
                        if recent and seen == {first + 1}:
                            break
                    assert seen == {first + 1}, seen
                finally:
                    stop.set()
                    await asyncio.wait_for(loader, 30)
                assert failures == []
                for url in (a, b):
                    items = await listed(url)
                    assert sorted(map(str, items)) == sorted(map(str, sent))
                assert {_branch(r["a"])[1] for r in app.records} == {first, first + 1}
                assert {_branch(r["a"])[0] for r in app.records} == {branch_id}
    finally:
        await app.close()
        del os.environ["SC_PROC_DSN"]
