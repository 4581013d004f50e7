"""Two ``sidecrypt run`` processes sharing one PostgreSQL vault write the same values at the
same time: the app sees one token per value, and each process resolves the other's tokens.
The schema is created with ``sidecrypt store migrate`` first, as an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sidecrypt.keyring import create_key

SIDECRYPT = [sys.executable, "-m", "sidecrypt.cli"]
SSN = {"format": "ssn", "consistent": True}
EMAIL = {"format": "email", "consistent": True}


def _config(path: Path, upstream: str) -> Path:
    keyring = path.parent / "keyring.json"
    create_key(keyring, "app")
    raw = {
        "listen": {"address": "127.0.0.1:0"},
        "admin": {"address": "127.0.0.1:0"},
        "upstream": {"url": upstream},
        "log": {"level": "info", "format": "json"},
        "keys": {"app": {"provider": "local", "keyring": str(keyring), "key": "app"}},
        "stores": {"vault": {"type": "postgresql", "dsn": {"env": "VAULT_DSN"}}},
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/write"},
                "key": "app",
                "request": {
                    "tokenize": [{"path": "$[*].ssn", **SSN}, {"path": "$[*].email", **EMAIL}]
                },
            },
            {
                "match": {"methods": ["POST"], "path": "/read"},
                "key": "app",
                "response": {
                    "detokenize": [{"path": "$[*].ssn", **SSN}, {"path": "$[*].email", **EMAIL}]
                },
            },
        ],
    }
    path.write_text(yaml.safe_dump(raw))
    return path


@contextlib.contextmanager
def _sidecar(config: Path, env: dict[str, str]) -> Iterator[str]:
    """One ``sidecrypt run`` process; yields its URL once it listens; killed at the end."""
    with subprocess.Popen(
        [*SIDECRYPT, "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    ) as proc:
        try:
            assert proc.stderr is not None
            deadline = time.monotonic() + 60
            url = None
            while time.monotonic() < deadline:
                line = proc.stderr.readline()
                if not line:
                    break
                if b"sidecrypt listening" in line:
                    port = json.loads(line)["addresses"][0][1]
                    url = f"http://127.0.0.1:{port}"
                    break
            assert url is not None, "sidecrypt did not start"
            drain = threading.Thread(target=proc.stderr.read, daemon=True)
            drain.start()
            yield url
        finally:
            proc.kill()


async def test_two_processes_agree_on_one_token_per_value(
    postgres: Any, upstream: Any, tmp_path: Path
) -> None:
    dsn = postgres.create_database(f"two_{uuid.uuid4().hex[:12]}")
    env = {"VAULT_DSN": dsn}
    config = _config(tmp_path / "sidecrypt.yaml", upstream.url)
    migrate = await asyncio.to_thread(
        subprocess.run,
        [*SIDECRYPT, "store", "migrate", "--config", str(config)],
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stderr
    people = [
        {
            "id": i,
            "ssn": f"{100 + i:03d}-{10 + i:02d}-{1000 + i:04d}",
            "email": f"person{i:03d}@example.org",
        }
        for i in range(60)
    ]
    with _sidecar(config, env) as a, _sidecar(config, env) as b:
        chunks = [people[i : i + 5] for i in range(0, len(people), 5)]
        async with aiohttp.ClientSession() as http:

            async def write(url: str, chunk: list[dict[str, str]]) -> None:
                async with http.post(f"{url}/write", json=chunk) as resp:
                    assert resp.status == 200, await resp.text()

            # Both sidecars write every value, in small concurrent batches, at the same time.
            await asyncio.gather(*(write(u, c) for c in chunks for u in (a, b)))
            tokens: dict[tuple[int, str], set[str]] = {}
            for seen in upstream.seen:
                for sent in json.loads(seen.body):
                    for field in ("ssn", "email"):
                        tokens.setdefault((sent["id"], field), set()).add(sent[field])
            assert len(upstream.seen) == 2 * len(chunks)
            assert len(tokens) == 2 * len(people)
            assert all(len(t) == 1 for t in tokens.values()), "a value got two tokens"
            stored = [
                {
                    "id": p["id"],
                    "ssn": next(iter(tokens[(p["id"], "ssn")])),
                    "email": next(iter(tokens[(p["id"], "email")])),
                }
                for p in people
            ]
            # Each sidecar resolves every token (half of them first written by the other).
            for url in (a, b):
                async with http.post(f"{url}/read", json=stored) as resp:
                    assert resp.status == 200
                    assert await resp.json() == people
    assert b"person001@example.org" not in upstream.all_bytes()
