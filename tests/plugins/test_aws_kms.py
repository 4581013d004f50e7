"""The KMS key provider against a real moto_server over HTTP, via the real aiobotocore client."""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from kms_server import DUMMY_ENV, KmsServer
from sidecrypt import appkeys
from sidecrypt.errors import CryptoError, KeyProviderError
from sidecrypt.keys import CacheLimits, DataKeyService, KeyProvider, canonical_context
from sidecrypt.plugin_manager import make_plugin_manager, provider_types
from sidecrypt.plugins import aws_kms
from sidecrypt.plugins.aws_kms import KmsKeyOptions, KmsKeyProvider, kms_key_status
from sidecrypt.plugins.aws_kms_resilience import CircuitBreaker

CTX = {"tenant": "acme", "route": "users"}
ALIAS = "alias/app"


pytestmark = pytest.mark.usefixtures("aws_env")  # moto and aws_env: tests/conftest.py


@pytest.fixture
def key(moto: KmsServer) -> dict[str, Any]:
    """A fresh moto state with one symmetric key behind ``alias/app``."""
    return moto.fresh_key(ALIAS, Description="sidecrypt test key")


Factory = Callable[..., Awaitable[KmsKeyProvider]]


@pytest.fixture
async def make_provider(moto: KmsServer) -> AsyncIterator[Factory]:
    made: list[KmsKeyProvider] = []

    async def make(key_id: str = ALIAS, *, start: bool = True, **extra: Any) -> KmsKeyProvider:
        opts = {
            "provider": "kms",
            "key_id": key_id,
            "region": "us-east-1",
            "endpoint_url": moto.url,
        }
        provider = KmsKeyProvider.create("billing", {**opts, **extra}, base_dir=Path.cwd())
        if start:
            await provider.start()
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


# -- configuration and registration -----------------------------------------------------------


def test_registered_as_builtin_plugin() -> None:
    types = provider_types(make_plugin_manager(entry_points=False))
    assert types["kms"] is KmsKeyProvider
    assert isinstance(
        KmsKeyProvider("k", KmsKeyOptions(key_id=ALIAS, region="eu-west-1")), KeyProvider
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"aws_secret_access_key": "x"},  # no credentials in YAML: unknown keys are refused
        {"key_id": ""},
        {"key_id": "alias/aws/s3"},
        {"endpoint_url": "ftp://host"},
        {"role_arn": "not-an-arn"},
        {"timeout": 0},
        {"max_attempts": 0},
    ],
)
def test_options_reject(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        KmsKeyOptions.model_validate(
            {"provider": "kms", "key_id": ALIAS, "region": "us-east-1", **bad}
        )


def test_options_defaults() -> None:
    opts = KmsKeyOptions.model_validate(
        {"provider": "kms", "key_id": "arn:aws:kms:us-east-1:1:key/x", "region": "us-east-1"}
    )
    assert (opts.timeout, opts.max_attempts, opts.breaker_failures) == (2.0, 3, 5)
    assert (opts.role_session_name, opts.outage_grace, opts.endpoint_url) == (
        "sidecrypt",
        300.0,
        None,
    )


# -- round trips --------------------------------------------------------------------------------


async def test_round_trip_by_key_id_arn_and_alias(
    key: dict[str, Any], make_provider: Factory
) -> None:
    by_alias = await make_provider(ALIAS)
    by_id = await make_provider(key["KeyId"])
    by_arn = await make_provider(key["Arn"])
    dk = await by_alias.generate_data_key(CTX)
    assert len(dk.plaintext) == 32 and dk.key_version == 0
    assert dk.plaintext not in dk.wrapped and repr(dk).count("bytes") == 1
    for provider in (by_alias, by_id, by_arn):
        assert (
            await provider.decrypt_data_key(dk.wrapped, 0, dict(reversed(CTX.items())))
            == dk.plaintext
        )
    assert by_alias.describe()["arn"] == key["Arn"]
    assert by_alias.stats.count("GenerateDataKey", "ok") == 1


async def test_empty_context_round_trips(key: dict[str, Any], make_provider: Factory) -> None:
    provider = await make_provider()
    dk = await provider.generate_data_key({})
    assert await provider.decrypt_data_key(dk.wrapped, 0, {}) == dk.plaintext


async def test_wrong_context_or_tampered_blob_is_crypto_error(
    key: dict[str, Any], make_provider: Factory
) -> None:
    provider = await make_provider(breaker_failures=1)
    dk = await provider.generate_data_key(CTX)
    with pytest.raises(CryptoError) as info:
        await provider.decrypt_data_key(dk.wrapped, 0, {**CTX, "tenant": "evil"})
    assert info.value.status == 502
    with pytest.raises(CryptoError):
        await provider.decrypt_data_key(dk.wrapped, 0, {})
    tampered = bytearray(dk.wrapped)
    tampered[-1] ^= 1
    with pytest.raises(CryptoError):
        await provider.decrypt_data_key(bytes(tampered), 0, CTX)
    with pytest.raises(CryptoError):
        await provider.decrypt_data_key(dk.wrapped, 3, CTX)
    # Bad ciphertexts say nothing about KMS health: not retried, breaker stays closed.
    assert provider.stats.count("Decrypt", "invalid_ciphertext") == 3
    assert provider.stats.retries == 0 and provider.breaker.state == "closed"
    await provider.check_ready()


async def test_unknown_key_fails_start(key: dict[str, Any], make_provider: Factory) -> None:
    with pytest.raises(KeyProviderError, match="not found"):
        await make_provider("alias/missing")


# -- credentials --------------------------------------------------------------------------------


async def test_assume_role_through_sts(
    moto: KmsServer, key: dict[str, Any], make_provider: Factory
) -> None:
    iam = moto.boto3_client("iam")
    role = iam.create_role(RoleName="sidecrypt", AssumeRolePolicyDocument="{}")["Role"]
    provider = await make_provider(role_arn=role["Arn"], role_session_name="sidecar-test")
    dk = await provider.generate_data_key(CTX)
    assert await provider.decrypt_data_key(dk.wrapped, 0, CTX) == dk.plaintext
    assert provider.stats.count("AssumeRole", "ok") == 1  # refreshed only near expiry
    creds = await provider._client._request_signer._credentials.get_frozen_credentials()
    assert creds.access_key != DUMMY_ENV["AWS_ACCESS_KEY_ID"] and creds.token
    assert provider.describe()["role_arn"] == role["Arn"]


async def test_shared_profile(
    key: dict[str, Any], make_provider: Factory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "credentials"
    creds.write_text("[sidecar]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = s3cr3t\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    provider = await make_provider(profile="sidecar")
    dk = await provider.generate_data_key(CTX)
    assert await provider.decrypt_data_key(dk.wrapped, 0, CTX) == dk.plaintext
    assert "s3cr3t" not in repr(provider.describe())
    with pytest.raises(KeyProviderError):
        await make_provider(profile="nope")


# -- caching through DataKeyService ----------------------------------------------------------


async def test_caching_cuts_kms_calls(key: dict[str, Any], make_provider: Factory) -> None:
    provider = await make_provider()
    svc = DataKeyService({"billing": provider})
    ctx = canonical_context(CTX)
    wrapped = set()
    for _ in range(1000):
        entry = await svc.for_encrypt("billing", ctx, 64)
        wrapped.add(entry.wrapped)
    assert provider.stats.count("GenerateDataKey") <= 3
    (blob,) = wrapped
    svc.clear()
    for _ in range(1000):
        await svc.for_decrypt("billing", blob, 0, ctx)
    assert provider.stats.count("Decrypt") == 1


async def test_concurrent_first_requests_share_one_call(
    key: dict[str, Any], make_provider: Factory
) -> None:
    provider = await make_provider()
    svc = DataKeyService({"billing": provider})
    ctx = canonical_context(CTX)
    entries = await asyncio.gather(*(svc.for_encrypt("billing", ctx) for _ in range(50)))
    assert len({e.wrapped for e in entries}) == 1
    assert provider.stats.count("GenerateDataKey") == 1
    svc.clear()
    aeads = await asyncio.gather(
        *(svc.for_decrypt("billing", entries[0].wrapped, 0, ctx) for _ in range(50))
    )
    assert len({id(a) for a in aeads}) == 1
    assert provider.stats.count("Decrypt") == 1


# -- faults -------------------------------------------------------------------------------------


async def test_outage_cached_keys_serve_breaker_opens_then_recovers(
    moto: KmsServer, key: dict[str, Any], make_provider: Factory
) -> None:
    provider = await make_provider(
        timeout=0.5, breaker_failures=2, breaker_reset=0.3, outage_grace=60
    )
    now = [0.0]
    svc = DataKeyService(
        {"billing": provider}, CacheLimits(max_age=10, decrypt_ttl=10), clock=lambda: now[0]
    )
    warm = canonical_context(CTX)
    cold = canonical_context({"tenant": "other"})
    enc = await svc.for_encrypt("billing", warm)
    await svc.for_decrypt("billing", enc.wrapped, 0, warm)

    moto.stop()
    assert (await svc.for_encrypt("billing", warm)) is enc  # fresh cached key: no KMS needed
    started = time.monotonic()
    for _ in range(2):
        with pytest.raises(KeyProviderError) as info:
            await svc.for_encrypt("billing", cold)
        assert info.value.status == 503 and info.value.retry_after >= 1
    assert time.monotonic() - started < 5  # refused connection: fails at once, no hang
    assert provider.stats.count("GenerateDataKey", "connection_error") == 2
    assert provider.breaker.state == "open"
    with pytest.raises(KeyProviderError, match="circuit"):
        await provider.check_ready()
    with pytest.raises(KeyProviderError, match="circuit"):
        await svc.for_encrypt("billing", cold)
    assert provider.stats.short_circuited["GenerateDataKey"] == 1

    # Past max_age / decrypt_ttl but within outage_grace: the expired keys still serve.
    now[0] = 30.0
    assert (await svc.for_encrypt("billing", warm)) is enc
    assert svc.cached_for_decrypt(enc.wrapped) is None
    await svc.for_decrypt("billing", enc.wrapped, 0, warm)
    assert svc.stats["stale_hits"] >= 2
    # Past the grace: fail closed.
    now[0] = 71.0
    with pytest.raises(KeyProviderError):
        await svc.for_encrypt("billing", warm)
    with pytest.raises(KeyProviderError):
        await svc.for_decrypt("billing", enc.wrapped, 0, warm)

    # KMS comes back (empty: moto forgets keys) on the same port; the same provider recovers.
    moto.start()
    moto.create_key(alias=ALIAS)
    await asyncio.sleep(0.35)  # breaker_reset: the next call is the half-open trial
    fresh = await svc.for_encrypt("billing", warm)
    assert fresh is not enc
    assert provider.breaker.state == "closed" and provider.outage_since is None
    await provider.check_ready()
    assert await provider.decrypt_data_key(fresh.wrapped, 0, CTX)


async def test_half_open_trial_failure_reopens(
    moto: KmsServer, key: dict[str, Any], make_provider: Factory
) -> None:
    provider = await make_provider(breaker_failures=1, breaker_reset=0.2)
    moto.stop()
    with pytest.raises(KeyProviderError):
        await provider.generate_data_key(CTX)
    assert provider.breaker.state == "open"
    await asyncio.sleep(0.25)
    assert provider.breaker.state == "half_open"
    with pytest.raises(KeyProviderError, match="connection_error"):
        await provider.generate_data_key(CTX)  # the trial call reaches out, and fails
    assert provider.breaker.state == "open" and provider.stats.breaker_opened == 2


async def test_slow_kms_times_out(
    moto: KmsServer, key: dict[str, Any], make_provider: Factory
) -> None:
    provider = await make_provider(timeout=0.3, max_attempts=3)
    moto.pause()
    try:
        started = time.monotonic()
        with pytest.raises(KeyProviderError, match="timeout"):
            await provider.generate_data_key(CTX)
        assert time.monotonic() - started < 3
        assert provider.stats.count("GenerateDataKey", "timeout") == 1  # timeouts are not retried
    finally:
        moto.resume()


async def test_readiness_follows_outage_budget(
    moto: KmsServer, key: dict[str, Any], make_provider: Factory
) -> None:
    provider = await make_provider(breaker_failures=100, outage_grace=0.5)
    await provider.check_ready()
    moto.stop()
    with pytest.raises(KeyProviderError):
        await provider.generate_data_key(CTX)
    assert provider.breaker.state == "closed"
    await asyncio.sleep(0.45)  # 80% of outage_grace spent
    with pytest.raises(KeyProviderError, match="failing for"):
        await provider.check_ready()


def test_breaker_rules() -> None:
    now = [0.0]
    breaker = CircuitBreaker(2, 5.0, clock=lambda: now[0])
    assert breaker.allow() and not breaker.failure() and breaker.state == "closed"
    breaker.success()
    assert not breaker.failure() and breaker.failure() and breaker.state == "open"
    assert not breaker.allow() and breaker.retry_after() == 5.0
    now[0] = 5.0
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.release()  # cancelled trial: no verdict, the next caller may try
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


# -- key status ---------------------------------------------------------------------------------


async def test_kms_key_status(moto: KmsServer, key: dict[str, Any]) -> None:
    moto.boto3_client("kms").enable_key_rotation(KeyId=key["KeyId"])
    status = await kms_key_status(
        {"provider": "kms", "key_id": ALIAS, "region": "us-east-1", "endpoint_url": moto.url}
    )
    assert status["key_id"] == key["KeyId"] and status["arn"] == key["Arn"]
    assert status["state"] == "Enabled" and status["rotation_enabled"] is True
    assert status["key_spec"] == "SYMMETRIC_DEFAULT"


def test_missing_aiobotocore_skips_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the ``[kms]`` extra the built-in is skipped, not a start-up crash."""
    monkeypatch.delitem(sys.modules, "sidecrypt.plugins.aws_kms")
    for name in [m for m in sys.modules if m == "aiobotocore" or m.startswith("aiobotocore.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "aiobotocore", None)
    types = provider_types(make_plugin_manager(entry_points=False))
    assert "kms" not in types and "local" in types
    assert aws_kms.sidecrypt_key_provider_types() == [KmsKeyProvider]


async def test_throttling_and_5xx_are_retried_with_backoff(
    aiohttp_server: Any, make_provider: Factory
) -> None:
    """A scripted KMS endpoint: 429/5xx are retried (each attempt counted), 4xx is not."""
    script: list[tuple[int, str]] = []
    seen: list[str] = []

    async def kms(request: web.Request) -> web.Response:
        op = request.headers["X-Amz-Target"].split(".")[-1]
        seen.append(op)
        if op == "GenerateDataKey" and script:
            status, code = script.pop(0)
            return web.json_response({"__type": code, "message": "scripted"}, status=status)
        blob = base64.b64encode(b"\x01" * 64).decode()
        return web.json_response(
            {
                "CiphertextBlob": blob,
                "Plaintext": base64.b64encode(b"\x02" * 32).decode(),
                "KeyId": "arn:aws:kms:us-east-1:123456789012:key/k",
                "KeyMetadata": {"KeyId": "k"},
            },
            content_type="application/x-amz-json-1.1",
        )

    app = web.Application()
    app.router.add_post("/", kms)
    server = await aiohttp_server(app, host="127.0.0.1")
    provider = await make_provider(endpoint_url=f"http://127.0.0.1:{server.port}", max_attempts=3)

    script[:] = [(400, "ThrottlingException"), (500, "KMSInternalException")]
    dk = await provider.generate_data_key(CTX)
    assert dk.plaintext == b"\x02" * 32
    assert provider.stats.count("GenerateDataKey", "throttled") == 1
    assert provider.stats.count("GenerateDataKey", "server_error") == 1
    assert provider.stats.retries == 2

    script[:] = [(503, "ServiceUnavailable")] * 3
    with pytest.raises(KeyProviderError, match="server_error") as info:
        await provider.generate_data_key(CTX)
    assert info.value.retry_after >= 1
    assert provider.stats.count("GenerateDataKey", "server_error") == 4  # 1 + 3 attempts

    script[:] = [(400, "AccessDeniedException")]
    with pytest.raises(KeyProviderError, match="AccessDenied"):
        await provider.generate_data_key(CTX)
    assert provider.stats.count("GenerateDataKey", "rejected") == 1 and provider.stats.retries == 4
    assert provider.breaker.consecutive == 2


# -- through the proxy ------------------------------------------------------------------------

SSN = "078-05-1120"


def kms_proxy_config(moto: KmsServer, upstream_url: str, **kms: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream_url},
        "keys": {
            "billing": {
                "provider": "kms",
                "key_id": ALIAS,
                "region": "us-east-1",
                "endpoint_url": moto.url,
                **kms,
            }
        },
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/users/**"},
                "key": "billing",
                "context": {"tenant": "header:X-Tenant", "app": "users"},
                "request": {"encrypt": ["$.ssn"]},
                "response": {"decrypt": ["$.ssn"]},
            }
        ],
    }


@pytest.fixture
async def kms_proxy(
    moto: KmsServer, key: dict[str, Any], upstream: Any, proxy_factory: Any, certs: Any
) -> AsyncIterator[tuple[Any, Any, KmsKeyProvider, aiohttp.ClientSession]]:
    proxy = await proxy_factory(
        kms_proxy_config(moto, upstream.url, timeout=0.5, breaker_failures=2, breaker_reset=0.3)
    )
    provider = proxy.running.runners[0].app[appkeys.KEYS].providers["billing"]
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        yield proxy, upstream, provider, client


async def _post(client: aiohttp.ClientSession, proxy: Any, tenant: str) -> aiohttp.ClientResponse:
    resp = await client.post(
        f"{proxy.url}/users/7", json={"ssn": SSN, "name": "Ann"}, headers={"X-Tenant": tenant}
    )
    await resp.read()
    return resp


async def test_proxy_round_trip_and_cache(kms_proxy: Any) -> None:
    proxy, upstream, provider, client = kms_proxy
    for _ in range(200):
        resp = await _post(client, proxy, "acme")
        assert resp.status == 200 and (await resp.json())["ssn"] == SSN
    assert len(upstream.seen) == 200
    assert SSN.encode() not in upstream.all_bytes()
    assert provider.stats.count("GenerateDataKey") == 1  # 200 requests, one data key
    assert provider.stats.count("Decrypt") == 1  # the echoed tokens share that data key


async def test_proxy_kms_outage_budget_and_recovery(moto: KmsServer, kms_proxy: Any) -> None:
    proxy, upstream, provider, client = kms_proxy
    assert (await _post(client, proxy, "acme")).status == 200
    moto.stop()
    # The warm tenant keeps working from cached keys.
    for _ in range(5):
        resp = await _post(client, proxy, "acme")
        assert resp.status == 200 and (await resp.json())["ssn"] == SSN
    # A new tenant needs KMS: 503 with Retry-After, and nothing reaches the upstream.
    before = len(upstream.seen)
    for _ in range(3):
        resp = await _post(client, proxy, "globex")
        assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json())["error"]["code"] == "key_provider_unavailable"
    assert len(upstream.seen) == before and SSN.encode() not in upstream.all_bytes()
    assert provider.breaker.state == "open"
    async with client.get(f"{proxy.admin_url}/readyz") as ready:
        assert ready.status == 503
        assert not (await ready.json())["checks"]["key:billing"]["ok"]

    moto.start()  # same port, empty state: the key comes back under the same alias
    moto.create_key(alias=ALIAS)
    await asyncio.sleep(0.35)
    resp = await _post(client, proxy, "globex")
    assert resp.status == 200 and (await resp.json())["ssn"] == SSN
    async with client.get(f"{proxy.admin_url}/readyz") as ready:
        assert ready.status == 200
