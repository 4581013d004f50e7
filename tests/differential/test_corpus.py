"""The differential corpus (issue 16): every row of corpus.py goes through a real sidecrypt on
127.0.0.1 to each real upstream (three Python parsers/binders and Node's express); no canary may
reach any of them, in the raw bytes (also percent-decoded, inflated, UTF-16) or in what the app
stored. Controls: unprotected requests arrive byte for byte, protected ones arrive encrypted."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import shutil
import urllib.parse
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.differential.corpus import CANARY, PROTECTED_ROWS, PUBLIC_ROWS, ROWS, Row
from tests.differential.upstreams import (
    NODE_DIR,
    PARSERS,
    Received,
    Recorder,
    express_upstream,
    python_upstream,
)

from sidecrypt.keyring import create_key

KINDS = [*PARSERS, "express"]
PROTECTED = ["$.ssn", "$.card.number", "$.contacts[*].phone", "$.kyc_id"]


def proxy_config(upstream_url: str, directory: Path) -> dict[str, Any]:
    create_key(directory / "keyring.json", "app")
    return {
        "upstream": {"url": upstream_url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json", "key": "app"}},
        "routes": [
            {
                "match": {"methods": ["POST", "PUT"], "path": "/users/**"},
                "key": "app",
                "request": {"encrypt": PROTECTED},
            }
        ],
    }


def _need_node() -> None:
    problem = None
    if shutil.which("node") is None:
        problem = "node is not installed (apt-get install nodejs npm)"
    elif not (NODE_DIR / "node_modules" / "express").is_dir():
        problem = f"express is not installed (cd {NODE_DIR} && npm ci)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem + "; .ci/run installs it")
        pytest.skip(problem)


@contextlib.asynccontextmanager
async def upstream(kind: str, aiohttp_server: Any, tmp: Path) -> AsyncIterator[Recorder]:
    if kind == "express":
        _need_node()
        async with express_upstream(tmp) as rec:
            yield rec
    else:
        async with python_upstream(kind, aiohttp_server) as rec:
            yield rec


async def send(port: int, row: Row) -> tuple[int, bytes]:
    """The row as exact bytes on a fresh connection; (status, whole answer)."""
    lines = [f"{row.method} {row.target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in row.headers]
    if row.chunked:
        lines.append("Transfer-Encoding: chunked")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(row.body), row.body) if row.body else b"0\r\n\r\n"
    else:
        if row.body or row.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(row.body)}")
        body = row.body
    lines.append("Connection: close")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(-1), timeout=20)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    try:
        return int(answer.split(b" ", 2)[1]), answer
    except (IndexError, ValueError):
        return 0, answer


def _views(rec: Received) -> dict[str, str]:
    """Every reading of what arrived that an app could make, as text to search."""
    raw = {
        "target": rec.target,
        "headers": "\n".join(f"{k}: {v}" for k, v in rec.headers),
        "body": rec.body.decode("latin-1"),
    }
    for codec in ("utf-16", "utf-32"):
        with contextlib.suppress(UnicodeDecodeError):
            raw[f"body as {codec}"] = rec.body.decode(codec)
    for name, inflate in (("gzip", gzip.decompress), ("deflate", zlib.decompress)):
        with contextlib.suppress(Exception):
            raw[f"body {name}-inflated"] = inflate(rec.body).decode("latin-1")
    views = dict(raw)
    for name, text in raw.items():
        for depth in (1, 2, 3):
            text = urllib.parse.unquote_plus(text, encoding="latin-1")
            views[f"{name} percent-decoded x{depth}"] = text
    views["stored"] = json.dumps(rec.stored, ensure_ascii=False, default=repr)
    return views


def leaks(rec: Received) -> list[str]:
    return [name for name, text in _views(rec).items() if CANARY.lower() in text.lower()]


def _absent(rec: Received, names: tuple[str, ...]) -> bool:
    got = {k.lower() for k, _ in rec.headers}
    return not any(n.lower() in got for n in names)


@pytest.mark.parametrize("kind", KINDS)
async def test_no_canary_reaches_any_upstream(
    kind: str, tmp_path: Path, aiohttp_server: Any, proxy_factory: Any
) -> None:
    async with upstream(kind, aiohttp_server, tmp_path) as rec:
        proxy = await proxy_factory(proxy_config(rec.url, tmp_path), tls=False, base_dir=tmp_path)
        port = int(proxy.url.rsplit(":", 1)[1])
        failures = []
        for row in ROWS:
            status, answer = await send(port, row)
            seen = rec.take()
            problems = []
            if not (200 <= status < 300 or 400 <= status < 500):
                problems.append(f"answer {status or answer[:60]!r}")
            for got in seen:
                if row.harmless_if_absent and _absent(got, row.harmless_if_absent):
                    continue
                where = leaks(got)
                if where:
                    stored = "STORED by the app, " if "stored" in where else ""
                    problems.append(f"canary {stored}in {', '.join(where[:2])} ({got.route})")
            if problems:
                failures.append(f"[class {row.cls}] {row.name}: {status}; {'; '.join(problems)}")
    assert not failures, f"{len(failures)}/{len(ROWS)} rows leak to {kind}:\n" + "\n".join(failures)


@pytest.mark.parametrize("kind", KINDS)
async def test_controls_arrive_intact_or_encrypted(
    kind: str, tmp_path: Path, aiohttp_server: Any, proxy_factory: Any
) -> None:
    """The corpus cannot pass by refusing everything."""
    async with upstream(kind, aiohttp_server, tmp_path) as rec:
        proxy = await proxy_factory(proxy_config(rec.url, tmp_path), tls=False, base_dir=tmp_path)
        port = int(proxy.url.rsplit(":", 1)[1])
        for row in PUBLIC_ROWS:
            status, answer = await send(port, row)
            assert status == 200, (row.name, answer[:200])
            [got] = rec.take()
            assert (got.method, got.target, got.body) == (row.method, row.target, row.body)
            for name, value in row.headers:
                assert (name.lower(), value) in {(k.lower(), v) for k, v in got.headers}
        for row in PROTECTED_ROWS:
            status, answer = await send(port, row)
            assert status == 200, (row.name, answer[:200])
            [got] = rec.take()
            assert got.method == row.method and got.target == row.target
            assert not leaks(got), (row.name, leaks(got))
            doc = json.loads(got.body)
            sent = json.loads(row.body)
            for key in ("ssn", "kyc_id"):
                if key in sent:
                    assert doc[key].startswith("sc1."), (row.name, key)
            if "card" in sent:
                assert doc["card"]["number"].startswith("sc1.")
                assert doc["contacts"][0]["phone"].startswith("sc1.")
            assert doc["name"] == sent["name"] if "name" in sent else True
