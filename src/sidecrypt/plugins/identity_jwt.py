"""JWT bearer tokens as caller identity, verified with joserfc against configured public keys.

Only asymmetric algorithms are accepted (RS256, ES256, EdDSA and its RFC 9864 name Ed25519),
and each algorithm only with its own key type: ``alg: none`` and the classic "HS256 signed with
the public key as HMAC secret" attack are refused before any signature check. Issuer, audience
and expiry are mandatory; ``nbf`` and ``iat`` are checked when present, all with a small leeway
for clock skew.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey, import_key
from joserfc.jws import extract_compact

from ..errors import ConfigError
from ..identity import Principal

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8192
MIN_RSA_BITS = 2048

# alg -> (key class, accepted curves or None)
_ALG_KEYS: dict[str, tuple[type[Key], frozenset[str] | None]] = {
    "RS256": (RSAKey, None),
    "ES256": (ECKey, frozenset({"P-256"})),
    "EdDSA": (OKPKey, frozenset({"Ed25519", "Ed448"})),
    "Ed25519": (OKPKey, frozenset({"Ed25519"})),  # RFC 9864's fully specified name for EdDSA
}
ALGORITHMS = tuple(_ALG_KEYS)


class TokenRejected(Exception):
    """A bearer token was presented but is not acceptable. ``reason`` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_keys(
    public_keys: tuple[Path, ...], jwks_file: Path | None, *, file: str, path: str
) -> list[Key]:
    """Read PEM public keys and a JWKS file; private keys and symmetric keys are refused."""
    keys: list[Key] = []
    for i, pem in enumerate(public_keys):
        where = f"{path}.public_keys[{i}]"
        try:
            data = pem.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {pem}: {exc.strerror}", file=file, path=where) from None
        if b"PRIVATE KEY" in data:
            raise ConfigError("give the public key, not the private key", file=file, path=where)
        keys.append(_import(data, where, file))
    if jwks_file is not None:
        where = f"{path}.jwks_file"
        try:
            doc = json.loads(jwks_file.read_bytes())
        except OSError as exc:
            msg = f"cannot read {jwks_file}: {exc.strerror}"
            raise ConfigError(msg, file=file, path=where) from None
        except ValueError:
            raise ConfigError("not a JSON document", file=file, path=where) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ConfigError('a JWKS is {"keys": [...]}', file=file, path=where)
        for j, entry in enumerate(doc["keys"]):
            if not isinstance(entry, dict):
                raise ConfigError("not a JWK object", file=file, path=f"{where}.keys[{j}]")
            if any(p in entry for p in ("d", "p", "q", "k")):
                msg = "private or symmetric key material in the JWKS"
                raise ConfigError(msg, file=file, path=f"{where}.keys[{j}]")
            if entry.get("use", "sig") != "sig":
                continue
            keys.append(_import(entry, f"{where}.keys[{j}]", file))
    if not keys:
        raise ConfigError("no verification keys configured", file=file, path=path)
    return keys


def _import(data: bytes | dict[str, Any], where: str, file: str) -> Key:
    for kty in ("RSA", "EC", "OKP"):
        if isinstance(data, dict) and data.get("kty") != kty:
            continue
        try:
            key: Key = import_key(data, kty)
        except (JoseError, ValueError, TypeError):
            continue
        if isinstance(key, RSAKey) and key.raw_value.key_size < MIN_RSA_BITS:
            raise ConfigError(f"RSA keys need at least {MIN_RSA_BITS} bits", file=file, path=where)
        key.ensure_kid()
        return key
    raise ConfigError("not an RSA, EC or OKP public key", file=file, path=where)


def _key_fits(key: Key, alg: str) -> bool:
    cls, curves = _ALG_KEYS[alg]
    if not isinstance(key, cls):
        return False
    if curves is not None and key.get("crv") not in curves:
        return False
    declared = key.get("alg")
    return declared in (None, alg)


def claim_at(claims: Mapping[str, Any], dotted: str) -> Any:
    """``realm_access.roles`` -> claims["realm_access"]["roles"] (None when absent)."""
    node: Any = claims
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def roles_from(value: Any) -> frozenset[str]:
    """A list of strings, or a space-separated string (``scope``); anything else gives none."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str) and v)
    return frozenset()


class JwtVerifier:
    """Verifies one bearer token. Built once per app; holds only public keys."""

    def __init__(
        self,
        keys: list[Key],
        *,
        issuer: str,
        audience: tuple[str, ...],
        algorithms: tuple[str, ...] = ALGORITHMS,
        leeway: int = 30,
        subject_claim: str = "sub",
        roles_claim: str | None = "roles",
    ) -> None:
        self.keys = keys
        self.algorithms = frozenset(a for a in algorithms if a in _ALG_KEYS)
        self.subject_claim = subject_claim
        self.roles_claim = roles_claim
        self.claims = jwt.JWTClaimsRegistry(
            leeway=leeway,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "values": list(audience)},
            exp={"essential": True},
        )

    def verify(self, token: str) -> Principal:
        """The principal the token names, or TokenRejected saying why (never echoing it)."""
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise TokenRejected("malformed")
        try:
            header = extract_compact(token.encode("ascii")).headers()
        except (JoseError, ValueError, UnicodeError):
            raise TokenRejected("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenRejected("algorithm not accepted")
        kid = header.get("kid")
        candidates = [k for k in self.keys if _key_fits(k, alg) and (kid is None or k.kid == kid)]
        if not candidates:
            raise TokenRejected("no matching key")
        claims = self._check_signature(token, alg, candidates)
        try:
            self.claims.validate(claims)
        except JoseError as exc:
            claim = getattr(exc, "claim", "")
            raise TokenRejected(f"{exc.error} {claim}".strip()) from None
        subject = claim_at(claims, self.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise TokenRejected(f"no {self.subject_claim} claim")
        roles = roles_from(claim_at(claims, self.roles_claim)) if self.roles_claim else frozenset()
        return Principal(id=subject, source="jwt", roles=roles, claims=claims)

    def _check_signature(self, token: str, alg: str, candidates: list[Key]) -> dict[str, Any]:
        for key in candidates:
            try:
                return jwt.decode(token, key, algorithms=[alg]).claims
            except JoseError:
                continue
            except (ValueError, TypeError):  # joserfc raises these for some malformed inputs
                continue
        raise TokenRejected("bad signature")
