"""TLS contexts: the listener (TLS 1.2+, Mozilla intermediate, optional mTLS) and the upstream.

Both offer only the X25519, P-256 and P-384 key-exchange groups (``http/tls_groups.py``).

Certificates are loaded at start-up, so a missing or broken file fails there with the setting's
dotted path, not at the first handshake. A reload builds fresh contexts with these same functions
and swaps them in whole (proxy/tls_reload.py): loading into a live context only ever adds CAs.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from yarl import URL

from ..config import ListenTLS, Upstream
from ..errors import ConfigError
from ..http.tls_groups import restrict_groups
from ..identity import PeerCertificate

log = logging.getLogger(__name__)

# Mozilla "intermediate" (TLS 1.2 part; TLS 1.3 suites are OpenSSL's defaults).
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)


def _readable(path: Path, setting: str, source: str | None) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path}: {exc.strerror}", file=source, path=setting
        ) from None


def _load_chain(ctx: ssl.SSLContext, tls: ListenTLS, source: str | None) -> None:
    _readable(tls.cert, "listen.tls.cert", source)
    _readable(tls.key, "listen.tls.key", source)
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"certificate and key do not load together ({exc.__class__.__name__})",
            file=source,
            path="listen.tls",
        ) from None
    if tls.client_ca is not None:
        _readable(tls.client_ca, "listen.tls.client_ca", source)
        try:
            ctx.load_verify_locations(cafile=str(tls.client_ca))
        except ssl.SSLError:
            raise ConfigError(
                "not a PEM CA bundle", file=source, path="listen.tls.client_ca"
            ) from None


def server_context(tls: ListenTLS, *, source: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    restrict_groups(ctx)  # X25519, P-256, P-384: no X448 / P-521 (Mozilla intermediate)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    if tls.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
    _load_chain(ctx, tls, source)
    return ctx


def upstream_context(upstream: Upstream, *, source: str | None = None) -> ssl.SSLContext | None:
    """Verified client context for an https upstream; None for plain http."""
    if URL(upstream.url).scheme != "https":  # yarl lower-cases: HTTPS:// is https too
        return None
    if upstream.ca is not None:
        _readable(upstream.ca, "upstream.ca", source)
    ctx = ssl.create_default_context(cafile=str(upstream.ca) if upstream.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    restrict_groups(ctx)
    if upstream.client_cert is not None:
        _readable(upstream.client_cert, "upstream.client_cert", source)
        key = upstream.client_key or upstream.client_cert
        _readable(key, "upstream.client_key", source)
        ctx.load_cert_chain(str(upstream.client_cert), str(key))
    if upstream.insecure_skip_verify:
        log.warning(
            "UPSTREAM TLS VERIFICATION IS OFF (upstream.insecure_skip_verify): "
            "traffic to the upstream can be intercepted"
        )
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCertificate | None:
    """The verified client certificate of a connection, if any."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    return PeerCertificate.from_ssl(cert) if cert else None
