"""Development certificates from trustme: a throwaway CA, a server and two client certificates.

For local use and the demo only. Production certificates come from your PKI.
"""

from __future__ import annotations

import os
from pathlib import Path

import trustme


def write_dev_certs(
    directory: Path, *, hostnames: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
) -> dict[str, Path]:
    """Write ca.pem, server.pem, server-key.pem, client.pem, client-key.pem (keys mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="sidecrypt dev CA")
    server = ca.issue_cert(*hostnames)
    client = ca.issue_cert("client@sidecrypt.local", common_name="sidecrypt-dev-client")
    paths = {
        "ca": directory / "ca.pem",
        "server_cert": directory / "server.pem",
        "server_key": directory / "server-key.pem",
        "client_cert": directory / "client.pem",
        "client_key": directory / "client-key.pem",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    _write_chain(server, paths["server_cert"])
    _write_chain(client, paths["client_cert"])
    for cert, key_path in ((server, paths["server_key"]), (client, paths["client_key"])):
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(cert.private_key_pem.bytes())
    return paths


def _write_chain(cert: trustme.LeafCert, path: Path) -> None:
    path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
