"""Caller identity: mTLS certificates, JWT bearer tokens, trusted front-proxy headers."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

from sidecrypt import appkeys, config, hookimpl
from sidecrypt.errors import ConfigError
from sidecrypt.identity import PeerCertificate, Principal
from sidecrypt.plugin_manager import make_plugin_manager
from sidecrypt.plugins import identity
from sidecrypt.plugins.identity import Identifier, MtlsConfig, principal_from_cert

ISS, AUD = "https://idp.test", "sidecrypt"

# -- mTLS ---------------------------------------------------------------------------------------


def ssl_dict(
    cn: str | None, dns: tuple[str, ...] = (), uri: tuple[str, ...] = ()
) -> dict[str, Any]:
    """What ``SSLObject.getpeercert()`` returns for a verified client certificate."""
    subject = ((("organizationName", "Test"),),) + (((("commonName", cn),),) if cn else ())
    return {
        "subject": subject,
        "issuer": ((("commonName", "Test CA"),),),
        "subjectAltName": tuple(("DNS", d) for d in dns) + tuple(("URI", u) for u in uri),
        "serialNumber": "0A",
    }


MTLS = MtlsConfig.model_validate(
    {
        "map": [
            {"uri": "spiffe://example.org/ns/billing/*", "id": "billing", "roles": ["billing"]},
            {"uri": "spiffe://example.org/*", "roles": ["internal"]},
            {"dns": "*.support.test", "roles": ["support"]},
            {"cn": "ops-*", "roles": ["ops"]},
        ]
    }
)


@pytest.mark.parametrize(
    ("cert", "expected"),
    [
        (
            ssl_dict("svc", uri=("spiffe://example.org/ns/billing/sa/api",)),
            Principal("billing", "mtls", frozenset({"billing", "internal"})),
        ),
        (
            ssl_dict("x", uri=("spiffe://example.org/ns/web/sa/fe",)),
            Principal("spiffe://example.org/ns/web/sa/fe", "mtls", frozenset({"internal"})),
        ),
        (
            ssl_dict("agent", dns=("desk1.support.test",)),
            Principal("desk1.support.test", "mtls", frozenset({"support"})),
        ),
        (ssl_dict("ops-alice"), Principal("ops-alice", "mtls", frozenset({"ops"}))),
        (ssl_dict("stranger"), Principal("stranger", "mtls", frozenset())),
        (ssl_dict(None), None),
    ],
)
def test_certificate_identities_map_to_principals(
    cert: dict[str, Any], expected: Principal | None
) -> None:
    assert principal_from_cert(PeerCertificate.from_ssl(cert), MTLS) == expected


def test_require_mapping_refuses_unmapped_certificates() -> None:
    strict = MTLS.model_copy(update={"require_mapping": True})
    assert principal_from_cert(PeerCertificate.from_ssl(ssl_dict("stranger")), strict) is None
    ops = principal_from_cert(PeerCertificate.from_ssl(ssl_dict("ops-bob")), strict)
    assert ops is not None and ops.roles == {"ops"}


def test_id_from_order_is_honoured() -> None:
    cfg = MtlsConfig(id_from=("cn",))
    cert = PeerCertificate.from_ssl(ssl_dict("by-cn", dns=("by-dns.test",)))
    assert principal_from_cert(cert, cfg) == Principal("by-cn", "mtls")


def _spiffe_client_cert(ca: trustme.CA, uri: str) -> tuple[bytes, bytes]:
    """trustme has no URI SANs: issue one with cryptography, signed by the trustme CA."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def _handshake_peer_cert(certs: Any, client_ctx: ssl.SSLContext) -> dict[str, Any]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    server_ctx.load_verify_locations(certs.ca_file)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(writer.get_extra_info("peercert"))
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = srv.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        result = await asyncio.wait_for(seen, 5)
        writer.close()
        return result
    finally:
        srv.close()
        await srv.wait_closed()


async def test_real_mtls_handshakes_give_distinct_principals(certs: Any, tmp_path: Path) -> None:
    ops = certs.issue_client("ops-carol", "carol.clients.test")
    ops_ctx = certs.client_context(client=ops)
    cert_pem, key_pem = _spiffe_client_cert(certs.ca, "spiffe://example.org/ns/billing/sa/api")
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    spiffe_ctx = certs.client_context()
    spiffe_ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")

    got_ops = principal_from_cert(
        PeerCertificate.from_ssl(await _handshake_peer_cert(certs, ops_ctx)), MTLS
    )
    got_spiffe = principal_from_cert(
        PeerCertificate.from_ssl(await _handshake_peer_cert(certs, spiffe_ctx)), MTLS
    )
    assert got_ops == Principal("carol.clients.test", "mtls", frozenset({"ops"}))
    assert got_spiffe == Principal("billing", "mtls", frozenset({"billing", "internal"}))


# -- JWT ----------------------------------------------------------------------------------------

RSA = RSAKey.generate_key(2048)
EC = ECKey.generate_key("P-256")
ED = OKPKey.generate_key("Ed25519")
OTHER_RSA = RSAKey.generate_key(2048)


def _settings(tmp_path: Path, identity_cfg: dict[str, Any]) -> config.Settings:
    return config.parse(
        {"upstream": {"url": "http://127.0.0.1:1"}, "identity": identity_cfg},
        file="test.yaml",
        base_dir=tmp_path,
    )


@pytest.fixture
def jwt_settings(tmp_path: Path) -> config.Settings:
    (tmp_path / "rsa.pem").write_bytes(RSA.as_pem(private=False))
    (tmp_path / "jwks.json").write_text(
        json.dumps({"keys": [EC.as_dict(private=False), ED.as_dict(private=False)]})
    )
    return _settings(
        tmp_path,
        {
            "jwt": {
                "issuer": ISS,
                "audience": AUD,
                "public_keys": ["rsa.pem"],
                "jwks_file": "jwks.json",
                "roles_claim": "realm_access.roles",
            },
            "header": {"trusted_cidrs": ["127.0.0.0/8"]},
        },
    )


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "realm_access": {"roles": ["auditor", "support"]},
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def token(alg: str = "RS256", key: Any = RSA, **over: Any) -> str:
    return jwt.encode({"alg": alg}, claims(**over), key, algorithms=[alg])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(alg: str, secret: bytes | None) -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    signing_input = f"{header}.{_b64(json.dumps(claims()).encode())}"
    if secret is None:
        return signing_input + "."
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def identify(
    settings: config.Settings, headers: dict[str, str], cert: PeerCertificate | None = None
) -> Principal | None:
    request = make_mocked_request("GET", "/users/1", headers=headers)
    request[appkeys.PEER_CERT] = cert
    return Identifier(settings).sidecrypt_identify(request)


@pytest.mark.parametrize(
    ("alg", "key"), [("RS256", RSA), ("ES256", EC), ("EdDSA", ED), ("Ed25519", ED)]
)
def test_valid_token_gives_principal_with_roles(
    jwt_settings: config.Settings, alg: str, key: Any
) -> None:
    got = identify(jwt_settings, {"Authorization": f"Bearer {token(alg, key)}"})
    assert got == Principal("alice", "jwt", frozenset({"auditor", "support"}))
    assert got is not None and got.claims["iss"] == ISS


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: token(exp=int(time.time()) - 120), id="expired"),
        pytest.param(lambda: token(exp=None), id="no-exp"),
        pytest.param(lambda: token(nbf=int(time.time()) + 600), id="not-yet-valid"),
        pytest.param(lambda: token(aud="someone-else"), id="wrong-audience"),
        pytest.param(lambda: token(iss="https://evil.test"), id="wrong-issuer"),
        pytest.param(lambda: token(key=OTHER_RSA), id="wrong-signature"),
        pytest.param(lambda: token("ES256", ECKey.generate_key("P-256")), id="unknown-ec-key"),
        pytest.param(lambda: token(sub=None), id="no-subject"),
        pytest.param(lambda: forged("none", None), id="alg-none"),
        pytest.param(lambda: forged("HS256", RSA.as_pem(private=False)), id="hs256-public-key"),
        pytest.param(lambda: token()[:-6] + "AAAAAA", id="tampered"),
        pytest.param(lambda: "not.a.token", id="garbage"),
        pytest.param(lambda: "x" * 9000, id="oversized"),
    ],
)
def test_bad_tokens_are_refused(jwt_settings: config.Settings, bad: Any) -> None:
    assert identify(jwt_settings, {"Authorization": f"Bearer {bad()}"}) is None


def test_leeway_tolerates_small_clock_skew(jwt_settings: config.Settings) -> None:
    skewed = token(exp=int(time.time()) - 5)  # leeway defaults to 30 s
    assert identify(jwt_settings, {"Authorization": f"Bearer {skewed}"}) is not None


def test_refused_token_does_not_fall_back_to_weaker_sources(
    jwt_settings: config.Settings,
) -> None:
    headers = {
        "Authorization": f"Bearer {token(iss='https://evil.test')}",
        "X-Sidecrypt-Principal": "admin",
    }
    assert identify(jwt_settings, headers) is None
    # ...while a non-bearer Authorization header (meant for the app) is not ours to judge
    basic = {"Authorization": "Basic YTpi"}
    assert identify(jwt_settings, basic) is None


def test_source_order_decides_between_certificate_and_token(tmp_path: Path) -> None:
    (tmp_path / "rsa.pem").write_bytes(RSA.as_pem(private=False))
    jwt_cfg = {"issuer": ISS, "audience": [AUD, "other"], "public_keys": ["rsa.pem"]}
    cert = PeerCertificate.from_ssl(ssl_dict("ops-dan"))
    headers = {"Authorization": f"Bearer {token()}"}
    mtls_first = _settings(tmp_path, {"mtls": {}, "jwt": jwt_cfg})
    jwt_first = _settings(tmp_path, {"order": ["jwt", "mtls"], "mtls": {}, "jwt": jwt_cfg})
    got = identify(mtls_first, headers, cert)
    assert got is not None and got.source == "mtls"
    got = identify(jwt_first, headers, cert)
    assert got is not None and (got.source, got.id) == ("jwt", "alice")


# -- trusted header, from real TCP peers -----------------------------------------------------------


async def _header_principal(aiohttp_client: Any, settings: config.Settings) -> Any:
    identifier = Identifier(settings)

    async def who(request: web.Request) -> web.Response:
        p = identifier.sidecrypt_identify(request)
        return web.json_response(None if p is None else [p.id, p.source, sorted(p.roles)])

    app = web.Application()
    app.router.add_get("/", who)
    client = await aiohttp_client(app)
    resp = await client.get(
        "/", headers={"X-Sidecrypt-Principal": "bob", "X-Sidecrypt-Roles": "support, ops"}
    )
    return await resp.json()


async def test_trusted_header_honoured_from_trusted_peer(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, {"header": {"trusted_cidrs": ["127.0.0.0/8", "::1/128"]}})
    assert await _header_principal(aiohttp_client, settings) == [
        "bob",
        "header",
        ["ops", "support"],
    ]


async def test_trusted_header_ignored_from_untrusted_peer(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, {"header": {"trusted_cidrs": ["10.0.0.0/8"]}})
    assert await _header_principal(aiohttp_client, settings) is None


# -- config errors, plugin wiring ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "path"),
    [
        ({"jwt": {"issuer": ISS, "audience": AUD}}, "identity.jwt"),
        (
            {"jwt": {"issuer": ISS, "audience": AUD, "public_keys": ["missing.pem"]}},
            "identity.jwt.public_keys[0]",
        ),
        (
            {"jwt": {"issuer": ISS, "audience": AUD, "public_keys": ["priv.pem"]}},
            "identity.jwt.public_keys[0]",
        ),
        (
            {"jwt": {"issuer": ISS, "audience": AUD, "jwks_file": "hs.json"}},
            "identity.jwt.jwks_file.keys[0]",
        ),
        (
            {
                "jwt": {
                    "issuer": ISS,
                    "audience": AUD,
                    "public_keys": ["rsa.pem"],
                    "algorithms": ["HS256"],
                }
            },
            "identity.jwt.algorithms[0]",
        ),
        ({"header": {"trusted_cidrs": ["10.0.0.0/33"]}}, "identity.header.trusted_cidrs"),
        ({"mtls": {"map": [{"cn": "a", "dns": "b"}]}}, "identity.mtls.map[0]"),
        ({"order": ["mtls", "ldap"]}, "identity.order[1]"),
    ],
)
def test_identity_config_errors_name_the_path(
    tmp_path: Path, cfg: dict[str, Any], path: str
) -> None:
    (tmp_path / "rsa.pem").write_bytes(RSA.as_pem(private=False))
    (tmp_path / "priv.pem").write_bytes(RSA.as_pem(private=True))
    (tmp_path / "hs.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ConfigError) as err:
        identity.validate(_settings(tmp_path, cfg))
    assert err.value.path == path, str(err.value)
    assert str(err.value).startswith("test.yaml: ")


async def test_sidecrypt_app_installs_identifier_and_third_party_wins(
    jwt_settings: config.Settings,
) -> None:
    class Fixed:
        @hookimpl
        def sidecrypt_identify(self, request: web.Request) -> Principal | None:
            return Principal("fixed", "custom") if "X-Custom" in request.headers else None

    pm = make_plugin_manager([Fixed()], entry_points=False)
    app = web.Application()
    app[appkeys.PLUGIN_MANAGER] = pm
    pm.hook.sidecrypt_app(app=app, settings=jwt_settings)
    identity.install(pm, jwt_settings)  # idempotent: replaced, not doubled
    assert len(pm.hook.sidecrypt_identify.get_hookimpls()) == 2
    bearer = {"Authorization": f"Bearer {token()}"}
    req = make_mocked_request("GET", "/", headers=bearer)
    assert pm.hook.sidecrypt_identify(request=req).id == "alice"
    req = make_mocked_request("GET", "/", headers={**bearer, "X-Custom": "1"})
    assert pm.hook.sidecrypt_identify(request=req) == Principal("fixed", "custom")


def test_describe_names_the_sources(jwt_settings: config.Settings, tmp_path: Path) -> None:
    assert identity.describe(jwt_settings) == (
        "identity: jwt, header (first that yields a principal wins)"
    )
    assert "anonymous" in identity.describe(_settings(tmp_path, {}))
