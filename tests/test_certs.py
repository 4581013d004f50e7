"""Development certificates (``sidecrypt certs dev``): made with cryptography, valid 90 days,
usable for a real TLS handshake with client certificates."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import stat
from pathlib import Path

from cryptography import x509

from sidecrypt.certs import write_dev_certs


def test_certificates_last_ninety_days_and_keys_are_private(tmp_path: Path) -> None:
    paths = write_dev_certs(tmp_path, clients=("alice", "bob"))
    now = datetime.datetime.now(datetime.UTC)
    for name in ("ca", "server_cert", "client_cert", "client:alice", "client:bob"):
        cert = x509.load_pem_x509_certificate(paths[name].read_bytes())
        lifetime = cert.not_valid_after_utc - now
        assert datetime.timedelta(days=89) < lifetime <= datetime.timedelta(days=90), name
    for name in ("server_key", "client_key", "client_key:alice", "client_key:bob"):
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o600, name
    bob = x509.load_pem_x509_certificate(paths["client:bob"].read_bytes())
    assert bob.subject.rfc4514_string() == "CN=bob"


async def test_server_and_client_certificates_complete_an_mtls_handshake(tmp_path: Path) -> None:
    paths = write_dev_certs(tmp_path, clients=("alice",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(paths["ca"]))
    server_ctx.load_cert_chain(paths["server_cert"], paths["server_key"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[object] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peercert")["subject"])
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = srv.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(paths["ca"]))
    client_ctx.load_cert_chain(paths["client:alice"], paths["client_key:alice"])
    for host in ("localhost", "127.0.0.1"):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=host), 10
        )
        assert await asyncio.wait_for(reader.read(), 10) == b"ok"
        writer.close()
    srv.close()
    await srv.wait_closed()
    assert seen == [((("commonName", "alice"),),)] * 2


def test_server_certificate_passes_a_strict_rfc5280_verifier(tmp_path: Path) -> None:
    """cryptography's verifier (sslyze's too) rejects what OpenSSL lets by, e.g. a critical SAN."""
    from cryptography.x509 import verification

    paths = write_dev_certs(tmp_path)
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    leaf = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier = (
            verification.PolicyBuilder().store(verification.Store([ca])).build_server_verifier(name)
        )
        verifier.verify(leaf, [])
