"""Who is calling: the principal that identity plugins produce and policy plugins judge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The verified mTLS client certificate, as Python's ``ssl`` reports it (no key material)."""

    subject: dict[str, str]
    issuer: dict[str, str]
    san_dns: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    serial: str = ""

    @property
    def common_name(self) -> str | None:
        return self.subject.get("commonName")

    @classmethod
    def from_ssl(cls, cert: dict[str, Any]) -> PeerCertificate:
        """Build from ``SSLObject.getpeercert()`` output."""

        def flatten(rdns: Any) -> dict[str, str]:
            return {k: v for rdn in rdns or () for (k, v) in rdn}

        sans = cert.get("subjectAltName", ())
        return cls(
            subject=flatten(cert.get("subject")),
            issuer=flatten(cert.get("issuer")),
            san_dns=tuple(v for k, v in sans if k == "DNS"),
            san_uri=tuple(v for k, v in sans if k == "URI"),
            serial=str(cert.get("serialNumber", "")),
        )


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``source`` says how it was established (mtls, jwt, header)."""

    id: str
    source: str
    roles: frozenset[str] = field(default_factory=frozenset)
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
