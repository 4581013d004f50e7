"""Routes with ``allow_gzip``: gzip JSON is decoded (bounded), transformed and sent as identity."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from tests.conftest import Certs

from sidecrypt.keyring import create_key


def _config(tmp_path: Path, upstream: str) -> dict[str, Any]:
    create_key(tmp_path / "ring.json", "app")
    return {
        "upstream": {"url": upstream},
        "keys": {"app": {"provider": "local", "keyring": str(tmp_path / "ring.json")}},
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/docs"},
                "key": "app",
                "allow_gzip": True,
                "max_body_size": 4096,
                "request": {"encrypt": ["$.secret"]},
                "response": {"decrypt": ["$.secret"]},
            }
        ],
    }


async def test_gzip_request_is_decoded_encrypted_and_sent_plain(
    certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any
) -> None:
    async def gzip_echo(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(
            body=gzip.compress(body),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    up = await upstream_factory(gzip_echo)
    proxy = await proxy_factory(_config(tmp_path, up.url))
    payload = gzip.compress(json.dumps({"secret": "canary-gzip", "n": 1}).encode())
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.post(
            proxy.url + "/docs",
            data=payload,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            ssl=certs.client_context(),
        ) as r,
    ):
        assert r.status == 200
        assert "Content-Encoding" not in r.headers  # the response was decoded to transform it
        assert json.loads(await r.read()) == {"secret": "canary-gzip", "n": 1}
    seen = up.seen[0]
    assert "content-encoding" not in {k.lower() for k, _ in seen.headers}
    stored = json.loads(seen.body)
    assert stored["secret"].startswith("sc1.") and stored["n"] == 1
    assert b"canary-gzip" not in up.all_bytes()


async def test_gzip_bomb_and_broken_gzip_are_refused(
    certs: Certs, tmp_path: Path, upstream: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory(_config(tmp_path, upstream.url))
    bomb = gzip.compress(b'{"secret": "' + b"a" * 1_000_000 + b'"}')
    assert len(bomb) < 4096
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/docs", data=bomb, headers=headers, ssl=certs.client_context()
        ) as r:
            assert r.status == 413
        cut = gzip.compress(b'{"secret": "short"}')[:-8]
        async with s.post(
            proxy.url + "/docs", data=cut, headers=headers, ssl=certs.client_context()
        ) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "bad_gzip"
        async with s.post(
            proxy.url + "/docs", data=b"not gzip", headers=headers, ssl=certs.client_context()
        ) as r:
            assert r.status == 400
    assert upstream.seen == []


async def test_gzip_upload_on_a_pass_through_route_reaches_the_upstream_as_sent(
    certs: Certs, upstream: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory({"upstream": {"url": upstream.url}})
    payload = gzip.compress(b"x" * 10_000)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/files",
            data=payload,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
            ssl=certs.client_context(),
        ) as r,
    ):
        assert r.status == 200
    # the test upstream decodes gzip itself: it can only do so if the bytes arrived as sent
    assert upstream.seen[0].body == b"x" * 10_000
    assert ("Content-Encoding", "gzip") in upstream.seen[0].headers
