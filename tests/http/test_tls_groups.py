"""TLS key-exchange groups: only X25519, P-256 and P-384, on the listener and the upstream
context; sidecrypt refuses to start when they cannot be restricted; sslyze finds the listener
compliant with Mozilla's intermediate profile (with the certificates ``sidecrypt certs dev``
writes)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from sidecrypt import config
from sidecrypt.certs import write_dev_certs
from sidecrypt.http import tls_groups
from sidecrypt.proxy import server, tls

ROOT = Path(__file__).resolve().parents[2]


def _client(certs: Any, curve: str) -> ssl.SSLContext:
    ctx = certs.client_context()
    ctx.set_ecdh_curve(curve)  # the client offers this one group only
    return ctx


async def _handshake(port: int, ctx: ssl.SSLContext) -> None:
    _r, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    writer.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_listener_serves_the_profile_groups_and_refuses_p521(
    certs: Any, upstream: Any, proxy_factory: Any, version: ssl.TLSVersion
) -> None:
    proxy = await proxy_factory({"upstream": {"url": upstream.url}})
    port = int(proxy.url.rsplit(":", 1)[1])
    # TLS 1.2 also needs the certificate's curve (P-256 here) among the client's groups
    both = version == ssl.TLSVersion.TLSv1_3
    for curve in ("prime256v1", "secp384r1") if both else ("prime256v1",):
        ctx = _client(certs, curve)
        ctx.maximum_version = version
        await _handshake(port, ctx)
    x25519 = certs.client_context()  # default client: X25519 first
    x25519.maximum_version = version
    await _handshake(port, x25519)
    if version == ssl.TLSVersion.TLSv1_3:
        # (under TLS 1.2 a P-521-only client fails on the P-256 certificate, or falls back to
        # DHE with an RSA one, whatever the groups: sslyze's scan below covers TLS 1.2's groups)
        ctx = _client(certs, "secp521r1")
        ctx.maximum_version = version
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _handshake(port, ctx)


def test_upstream_context_is_restricted_too() -> None:
    ctx = tls.upstream_context(config.Upstream(url="https://up.test"))
    assert ctx is not None
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        probe.load_cert_chain(*tls_groups._self_signed(Path(tmp)))
    probe.set_ecdh_curve("secp521r1")  # a server that takes only P-521 must find no group
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    assert not _pair(probe, ctx)
    probe.set_ecdh_curve("secp384r1")
    assert _pair(probe, ctx)


def _pair(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bool:
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = client_ctx.wrap_bio(bios[0], bios[1], server_hostname="up.test")
    s = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, end in enumerate((c, s)):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLError:
                    return False
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
        if all(done):
            return True
    return False


def test_startup_fails_closed_when_the_groups_cannot_be_set(
    certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssl.SSLContext, "set_groups", None, raising=False)

    class Broken:
        def SSL_CTX_ctrl(self, *args: Any) -> int:
            return 0

        def SSL_CTX_get_options(self, ptr: int) -> int:
            return -1  # does not read back: the pointer check must refuse

        def SSL_CTX_get_security_level(self, ptr: int) -> int:
            return -1

    monkeypatch.setattr(tls_groups, "_libssl", Broken)
    listen = config.ListenTLS(cert=certs.server_cert, key=certs.server_key)
    with pytest.raises(tls_groups.TLSGroupsError) as err:
        tls.server_context(listen)
    assert err.value.code == "tls_groups"


def test_startup_fails_closed_when_openssl_refuses_the_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = tls_groups._libssl()

    class Refusing:
        SSL_CTX_get_options = real.SSL_CTX_get_options
        SSL_CTX_get_security_level = real.SSL_CTX_get_security_level

        def SSL_CTX_ctrl(self, *args: Any) -> int:
            return 0

    monkeypatch.setattr(tls_groups, "_libssl", Refusing)
    with pytest.raises(tls_groups.TLSGroupsError, match="refused"):
        tls_groups._set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))


def sslyze() -> str:
    found = os.environ.get("SIDECRYPT_SSLYZE") or shutil.which("sslyze")
    local = ROOT / ".venv-sslyze" / "bin" / "sslyze"
    if found is None and local.exists():
        found = str(local)
    if found is None:
        hint = "python3 -m venv .venv-sslyze && .venv-sslyze/bin/pip install sslyze==6.3.1"
        if os.environ.get("CI"):
            pytest.fail(f"sslyze is not installed (.ci/run does: {hint})")
        pytest.skip(f"sslyze is not installed ({hint})")
    return found


async def test_sslyze_finds_the_listener_mozilla_intermediate_compliant(
    tmp_path: Path, upstream: Any
) -> None:
    exe = sslyze()
    dev = write_dev_certs(tmp_path / "certs")
    settings = config.parse(
        {
            "listen": {
                "address": "127.0.0.1:0",
                "tls": {"cert": str(dev["server_cert"]), "key": str(dev["server_key"])},
            },
            "admin": {"address": None},
            "upstream": {"url": upstream.url},
        },
        file="test.yaml",
        base_dir=tmp_path,
    )
    running, stop = await server.start(settings)
    try:
        port = running.addresses()[0][1]
        out = tmp_path / "sslyze.json"
        proc = await asyncio.create_subprocess_exec(
            exe,
            "--mozilla_config=intermediate",
            f"--certinfo_ca_file={dev['ca']}",
            f"--json_out={out}",
            f"127.0.0.1:{port}",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        await stop()
    text = stdout.decode(errors="replace")
    sys.stdout.write(text)
    assert proc.returncode == 0, text  # sslyze exits 1 when not compliant
    assert "OK - Compliant" in text
    result = json.loads(out.read_text())["server_scan_results"][0]["scan_result"]
    curves = {c["name"] for c in result["elliptic_curves"]["result"]["supported_curves"]}
    assert curves == {"X25519", "secp256r1", "secp384r1"}
    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        assert not result[f"{old}_cipher_suites"]["result"]["accepted_cipher_suites"]


def test_no_pointer_is_read_on_a_python_of_unknown_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssl.SSLContext, "set_groups", None, raising=False)
    monkeypatch.setattr(sys, "implementation", type("Impl", (), {"name": "pypy"})())
    with pytest.raises(tls_groups.TLSGroupsError, match="this Python"):
        tls_groups._set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
