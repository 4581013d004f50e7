"""Development certificates: a throwaway CA, a server certificate and client certificates.

For local use and the demo only; production certificates come from your PKI. Made with
``cryptography`` (ECDSA P-256, SHA-256), so a runtime install needs no test library, and valid
for 90 days, as public CAs issue them: a forgotten dev certificate does not outlive its use.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 90
_CA_NAME = "sidecrypt dev CA"


def write_dev_certs(
    directory: Path,
    *,
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    clients: tuple[str, ...] = ("sidecrypt-dev-client",),
    days: int = VALID_DAYS,
) -> dict[str, Path]:
    """Write ca.pem, server.pem, server-key.pem and a certificate per client (keys mode 0600).

    The first client is client.pem / client-key.pem; every client is also
    ``client-<cn>.pem`` / ``client-<cn>-key.pem`` (keys ``client:<cn>``, ``client_key:<cn>``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _CA_NAME)])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(
        name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, ca.subject, key.public_key(), now, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        return cert, key

    server, server_key = leaf(
        hostnames[0], [_san(h) for h in hostnames], ExtendedKeyUsageOID.SERVER_AUTH
    )
    paths["server_cert"] = directory / "server.pem"
    paths["server_key"] = directory / "server-key.pem"
    _write(paths["server_cert"], paths["server_key"], server, server_key, ca)
    for i, cn in enumerate(clients):
        cert, key = leaf(
            cn, [x509.DNSName(f"{cn}.clients.sidecrypt.local")], ExtendedKeyUsageOID.CLIENT_AUTH
        )
        cert_path, key_path = directory / f"client-{cn}.pem", directory / f"client-{cn}-key.pem"
        _write(cert_path, key_path, cert, key, ca)
        paths[f"client:{cn}"], paths[f"client_key:{cn}"] = cert_path, key_path
        if i == 0:
            paths["client_cert"], paths["client_key"] = (
                directory / "client.pem",
                directory / "client-key.pem",
            )
            _write(paths["client_cert"], paths["client_key"], cert, key, ca)
    return paths


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # small clock skews
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
) -> None:
    """The chain (leaf, then CA) and the key, created 0600 (never briefly readable by others)."""
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, ca)))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
