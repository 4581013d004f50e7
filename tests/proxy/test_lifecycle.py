"""Process lifecycle through the real ``sidecrypt run`` (uvloop): drain on SIGTERM, reload on SIGHUP.

The SIGHUP tests: a new server certificate, and a client CA replaced in its file is revoked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from tests.conftest import Certs
from tests.proxy.test_tls_reload import _resume


async def _start(config: Path) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecrypt.cli",
        "run",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line, "sidecrypt exited before listening"
        if b"sidecrypt listening" in line:
            record = json.loads(line)
            assert record["engine"] == "lean"  # the default, and the log says which serves
            return proc, record["addresses"][0][1]


def _write_config(tmp_path: Path, upstream: str, cert: Path, key: Path, grace: float = 10) -> Path:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        f"upstream: {{url: '{upstream}'}}\n"
        f"listen: {{address: '127.0.0.1:0', tls: {{cert: '{cert}', key: '{key}'}}}}\n"
        f"admin: {{address: null}}\nserver: {{grace_period: {grace}}}\n"
    )
    return cfg


async def test_sigterm_drains_in_flight_requests(
    certs: Certs, aiohttp_server: Any, tmp_path: Path
) -> None:
    started = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(1.0)
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/slow", slow)
    up = await aiohttp_server(app, host="127.0.0.1")
    proc, port = await _start(
        _write_config(tmp_path, f"http://127.0.0.1:{up.port}", certs.server_cert, certs.server_key)
    )
    try:
        async with aiohttp.ClientSession() as s:
            pending = asyncio.create_task(
                s.get(f"https://localhost:{port}/slow", ssl=certs.client_context())
            )
            await asyncio.wait_for(started.wait(), 10)
            proc.send_signal(signal.SIGTERM)
            resp = await asyncio.wait_for(pending, 10)
            assert resp.status == 200
            assert await resp.text() == "finished"
            resp.release()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_sighup_reloads_certificates_without_dropping_connections(
    certs: Certs, upstream: Any, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(cn: str) -> None:
        leaf = certs.ca.issue_cert("localhost", common_name=cn)
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))

    install("before-reload")
    proc, port = await _start(_write_config(tmp_path, upstream.url, cert, key))

    async def served_cn() -> str:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=certs.client_context(), server_hostname="localhost"
        )
        peer = writer.get_extra_info("peercert")
        writer.close()
        return str(dict(x[0] for x in peer["subject"])["commonName"])

    try:
        assert await served_cn() == "before-reload"
        ctx = certs.client_context()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://localhost:{port}/a", ssl=ctx) as r:
                assert r.status == 200
            install("after-reload")
            os.kill(proc.pid, signal.SIGHUP)
            for _ in range(50):
                if await served_cn() == "after-reload":
                    break
                await asyncio.sleep(0.1)
            assert await served_cn() == "after-reload"
            # the keep-alive connection opened before the reload still works
            async with s.get(f"https://localhost:{port}/b", ssl=ctx) as r:
                assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)


async def test_sighup_revokes_a_client_ca_removed_from_its_file(
    certs: Certs, upstream: Any, tmp_path: Path
) -> None:
    ca_a, ca_b = trustme.CA(), trustme.CA()
    bundle = tmp_path / "client-ca.pem"
    ca_a.cert_pem.write_to_path(str(bundle))
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        f"upstream: {{url: '{upstream.url}'}}\n"
        f"listen: {{address: '127.0.0.1:0', tls: {{cert: '{certs.server_cert}', "
        f"key: '{certs.server_key}', client_ca: '{bundle}'}}}}\n"
        "admin: {address: null}\nserver: {tls_reload_interval: 0}\n"  # the signal alone
    )
    proc, port = await _start(cfg)
    from_a = certs.client_context(client=ca_a.issue_cert("a.test", common_name="a"))
    from_b = certs.client_context(client=ca_b.issue_cert("b.test", common_name="b"))

    async def status(ctx: Any) -> int | str:
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"https://localhost:{port}/r", ssl=ctx) as r,
            ):
                return r.status
        except (aiohttp.ClientError, ConnectionError):
            return "refused"

    try:
        assert (await status(from_a), await status(from_b)) == (200, "refused")
        code, session, _ = await asyncio.to_thread(_resume, port, from_a, None)
        code, session, reused = await asyncio.to_thread(_resume, port, from_a, session)
        assert (code, reused) == (200, True)  # resumption works here, so refusing it is real
        ca_b.cert_pem.write_to_path(str(bundle))
        os.kill(proc.pid, signal.SIGHUP)
        for _ in range(100):  # bounded: the reload is logged once done
            if await status(from_b) == 200:
                break
            await asyncio.sleep(0.1)
        assert (await status(from_a), await status(from_b)) == ("refused", 200)
        with pytest.raises((ssl.SSLError, ConnectionError)):  # nor by resuming (uvloop here)
            await asyncio.to_thread(_resume, port, from_a, session)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
