"""Built-in caller identity: mTLS client certificate, JWT bearer token, trusted front-proxy header.

Config (``identity:``)::

    identity:
      order: [mtls, jwt, header]      # first source that yields a principal wins
      mtls:                           # active by default when listen.tls.client_ca is set
        id_from: [uri, dns, cn]       # principal id: first SAN URI, else SAN DNS, else CN
        map:                          # roles (and optional id) for certificates, by glob
          - {uri: "spiffe://example.org/ns/billing/*", id: billing, roles: [billing]}
          - {cn: "ops-*", roles: [ops]}
        require_mapping: false        # true: a certificate no entry matches gets no principal
      jwt:
        issuer: https://idp.example
        audience: sidecrypt
        public_keys: [keys/idp.pem]   # and/or jwks_file: keys/jwks.json
        roles_claim: realm_access.roles
      header:                         # only from these TCP peers (the front proxy)
        trusted_cidrs: [10.0.0.0/8]

A bearer token that is present but invalid ends identification with no principal (the caller is
anonymous): sidecrypt never falls back to a weaker source when a presented credential fails.

Per-app state lives in an :class:`Identifier` that the module-level ``sidecrypt_app`` hook
registers on the app's plugin manager; nothing here is module-global.
"""

from __future__ import annotations

import ipaddress
import logging
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pluggy
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import appkeys, hookimpl
from ..errors import ConfigError
from ..identity import PeerCertificate, Principal
from . import _per_app

if TYPE_CHECKING:
    from aiohttp import web

    from ..config import Settings
    from ..proxy.incoming import RequestView
    from .identity_jwt import JwtVerifier

log = logging.getLogger(__name__)

Source = Literal["mtls", "jwt", "header"]
SOURCES: tuple[Source, ...] = ("mtls", "jwt", "header")
PLUGIN_NAME = "sidecrypt.identity.per-app"
MAX_HEADER_VALUE = 256


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MtlsMapping(_Model):
    """Certificates whose CN, SAN DNS or SAN URI matches ``pattern`` (fnmatch) get these roles."""

    cn: str | None = None
    dns: str | None = None
    uri: str | None = None
    id: Annotated[str | None, Field(min_length=1)] = None
    roles: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one(self) -> MtlsMapping:
        if sum(v is not None for v in (self.cn, self.dns, self.uri)) != 1:
            raise ValueError("give exactly one of cn, dns or uri")
        return self


class MtlsConfig(_Model):
    id_from: tuple[Literal["uri", "dns", "cn"], ...] = ("uri", "dns", "cn")
    map: tuple[MtlsMapping, ...] = ()
    require_mapping: bool = False


class JwtConfig(_Model):
    issuer: str = Field(min_length=1)
    audience: tuple[str, ...] = Field(min_length=1)
    public_keys: tuple[Path, ...] = ()
    jwks_file: Path | None = None
    algorithms: tuple[Literal["RS256", "ES256", "EdDSA", "Ed25519"], ...] = (
        "RS256",
        "ES256",
        "EdDSA",
        "Ed25519",
    )
    leeway: Annotated[int, Field(ge=0, le=300)] = 30  # seconds of clock skew for exp/nbf/iat
    subject_claim: str = "sub"
    roles_claim: str | None = "roles"
    header: str = "Authorization"

    @field_validator("audience", mode="before")
    @classmethod
    def _one_audience(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _keys(self) -> JwtConfig:
        if not self.public_keys and self.jwks_file is None:
            raise ValueError("give public_keys or jwks_file")
        return self


class HeaderConfig(_Model):
    trusted_cidrs: tuple[str, ...] = Field(min_length=1)
    principal_header: str = "X-Sidecrypt-Principal"
    roles_header: str = "X-Sidecrypt-Roles"

    @field_validator("trusted_cidrs")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network (e.g. 10.0.0.0/8)") from None
        return value


class IdentityConfig(_Model):
    order: tuple[Source, ...] = SOURCES
    mtls: MtlsConfig | None = None
    jwt: JwtConfig | None = None
    header: HeaderConfig | None = None


def configured_sources(settings: Settings) -> tuple[str, ...]:
    """Sources that can produce a principal under these settings, in precedence order."""
    cfg: IdentityConfig = settings.identity
    tls = settings.listen.tls
    active = {
        "mtls": cfg.mtls is not None or (tls is not None and tls.client_ca is not None),
        "jwt": cfg.jwt is not None,
        "header": cfg.header is not None,
    }
    return tuple(s for s in cfg.order if active[s])


def principal_from_cert(cert: PeerCertificate, cfg: MtlsConfig) -> Principal | None:
    """Map a verified client certificate to a principal (roles from every matching entry)."""
    values = {"uri": cert.san_uri, "dns": cert.san_dns, "cn": (cert.common_name or "",)}
    roles: set[str] = set()
    mapped_id: str | None = None
    matched = False
    for entry in cfg.map:
        kind, pattern = next(
            (k, getattr(entry, k)) for k in ("uri", "dns", "cn") if getattr(entry, k)
        )
        hit = next((v for v in values[kind] if v and fnmatchcase(v, pattern)), None)
        if hit is None:
            continue
        matched = True
        roles.update(entry.roles)
        if mapped_id is None and entry.id is not None:
            mapped_id = entry.id
    if cfg.require_mapping and not matched:
        return None
    ident = mapped_id or next((v for k in cfg.id_from for v in values[k] if v), None)
    if ident is None:
        return None
    return Principal(id=ident, source="mtls", roles=frozenset(roles))


def peer_ip(request: RequestView) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The TCP peer's address (never a forwarded header); None for unix sockets or closed ones."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        return ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return None


class Identifier:
    """Per-app identity: compiled config, JWT keys loaded once. Registered on the app's pm."""

    def __init__(self, settings: Settings) -> None:
        cfg: IdentityConfig = settings.identity
        self.sources = configured_sources(settings)
        self.mtls = cfg.mtls or MtlsConfig()
        self.header = cfg.header
        self.networks = tuple(
            ipaddress.ip_network(c, strict=False)
            for c in (cfg.header.trusted_cidrs if cfg.header else ())
        )
        self.jwt: JwtVerifier | None = _make_verifier(settings) if cfg.jwt else None
        self.jwt_header = cfg.jwt.header if cfg.jwt else "Authorization"

    @hookimpl(trylast=True)
    def sidecrypt_identify(self, request: RequestView) -> Principal | None:
        for source in self.sources:
            if source == "mtls":
                cert = request.get(appkeys.PEER_CERT)
                principal = principal_from_cert(cert, self.mtls) if cert is not None else None
            elif source == "jwt":
                found = self._from_jwt(request)
                if found is False:
                    return None  # a presented token was refused: no fallback
                principal = found
            else:
                principal = self._from_header(request)
            if principal is not None:
                return principal
        return None

    def _from_jwt(self, request: RequestView) -> Principal | Literal[False] | None:
        from .identity_jwt import TokenRejected

        assert self.jwt is not None
        value = request.headers.get(self.jwt_header)
        if value is None:
            return None
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None  # not ours (e.g. Basic auth meant for the app)
        try:
            return self.jwt.verify(token.strip())
        except TokenRejected as exc:
            log.info("bearer token refused", extra={"reason": exc.reason})
            return False

    def _from_header(self, request: RequestView) -> Principal | None:
        assert self.header is not None
        ident = request.headers.get(self.header.principal_header)
        if not ident:
            return None
        ip = peer_ip(request)
        if ip is None or not any(ip in net for net in self.networks):
            log.warning(
                "identity header from an untrusted peer ignored",
                extra={"peer": str(ip), "header": self.header.principal_header},
            )
            return None
        ident = ident.strip()
        if not ident or len(ident) > MAX_HEADER_VALUE:
            return None
        raw_roles = request.headers.get(self.header.roles_header, "")[: MAX_HEADER_VALUE * 16]
        roles = frozenset(r.strip() for r in raw_roles.split(",") if r.strip())
        return Principal(id=ident, source="header", roles=roles)


def _make_verifier(settings: Settings) -> JwtVerifier:
    cfg = settings.identity.jwt
    assert cfg is not None
    try:
        from .identity_jwt import JwtVerifier, load_keys
    except ImportError:
        raise ConfigError(
            "JWT identity needs joserfc: pip install 'sidecrypt[jwt]'",
            file=settings.source,
            path="identity.jwt",
        ) from None
    base = settings.base_dir
    keys = load_keys(
        tuple(base / p for p in cfg.public_keys),
        base / cfg.jwks_file if cfg.jwks_file is not None else None,
        file=settings.source,
        path="identity.jwt",
    )
    return JwtVerifier(
        keys,
        issuer=cfg.issuer,
        audience=cfg.audience,
        algorithms=cfg.algorithms,
        leeway=cfg.leeway,
        subject_claim=cfg.subject_claim,
        roles_claim=cfg.roles_claim,
    )


def validate(settings: Settings) -> None:
    """Start-up and check-config: JWT keys readable and usable (ConfigError with dotted path)."""
    if settings.identity.jwt is not None:
        _make_verifier(settings)


def install(pm: pluggy.PluginManager, settings: Settings) -> Identifier:
    """Register (or replace) this app's Identifier on ``pm``."""
    return _per_app.install(pm, PLUGIN_NAME, Identifier(settings))


def describe(settings: Settings) -> str:
    sources = configured_sources(settings)
    if not sources:
        return "identity: no source configured; every caller is anonymous"
    return "identity: " + ", ".join(sources) + " (first that yields a principal wins)"


@hookimpl(trylast=True)
def sidecrypt_app(app: web.Application, settings: Settings) -> None:
    install(app[appkeys.PLUGIN_MANAGER], settings)
