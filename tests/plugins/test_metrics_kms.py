"""KMS request, retry and breaker series on /metrics, through a running proxy and moto_server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kms_server import KmsServer
from sidecrypt import appkeys

SSN = "078-05-1120"


pytestmark = pytest.mark.usefixtures("aws_env")  # moto and aws_env: tests/conftest.py


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: aiohttp.ClientSession, admin_url: str) -> tuple[str, Samples]:
    async with client.get(f"{admin_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    return text, samples


def get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset({"key": "billing", "provider": "kms", **labels}.items())))


async def test_kms_series_follow_the_provider_through_an_outage(
    moto: KmsServer, upstream: Any, proxy_factory: Callable[..., Awaitable[Any]], certs: Any
) -> None:
    moto.fresh_key("alias/billing")
    proxy = await proxy_factory(
        {
            "upstream": {"url": upstream.url},
            "keys": {
                "billing": {
                    "provider": "kms",
                    "key_id": "alias/billing",
                    "region": "us-east-1",
                    "endpoint_url": moto.url,
                    "timeout": 0.5,
                    "breaker_failures": 2,
                    "breaker_reset": 30,
                }
            },
            "routes": [
                {
                    "match": {"methods": ["POST"], "path": "/users/**"},
                    "key": "billing",
                    "context": {"tenant": "header:X-Tenant"},
                    "request": {"encrypt": ["$.ssn"]},
                    "response": {"decrypt": ["$.ssn"]},
                }
            ],
        }
    )
    provider = proxy.running.runners[0].app[appkeys.KEYS].providers["billing"]
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:

        async def post(tenant: str) -> int:
            async with client.post(
                f"{proxy.url}/users/1", json={"ssn": SSN}, headers={"X-Tenant": tenant}
            ) as resp:
                await resp.read()
                return resp.status

        for _ in range(5):
            assert await post("acme") == 200
        text, samples = await scrape(client, proxy.admin_url)
        for (op, outcome), n in provider.stats.calls.items():
            assert get(samples, "sidecrypt_kms_requests_total", operation=op, outcome=outcome) == n
        assert (
            get(samples, "sidecrypt_kms_requests_total", operation="GenerateDataKey", outcome="ok")
            == 1
        )
        assert get(samples, "sidecrypt_kms_requests_total", operation="Decrypt", outcome="ok") == 1
        assert get(samples, "sidecrypt_kms_breaker_state", state="closed") == 1
        assert get(samples, "sidecrypt_kms_breaker_state", state="open") == 0
        assert get(samples, "sidecrypt_kms_outage_seconds") == 0
        assert get(samples, "sidecrypt_kms_retries_total") == 0
        assert SSN not in text and "acme" not in text  # no values, no context in labels

        moto.stop()  # KMS goes away: new tenants need it
        assert await post("globex") == 503
        assert await post("initech") == 503  # second failure opens the breaker
        assert await post("umbrella") == 503  # refused locally, no request sent
        _, samples = await scrape(client, proxy.admin_url)
    failed = provider.stats.count("GenerateDataKey", "connection_error")
    assert failed == 2
    assert (
        get(
            samples,
            "sidecrypt_kms_requests_total",
            operation="GenerateDataKey",
            outcome="connection_error",
        )
        == failed
    )
    assert get(samples, "sidecrypt_kms_short_circuited_total", operation="GenerateDataKey") == 1
    assert get(samples, "sidecrypt_kms_breaker_opened_total") == 1
    assert get(samples, "sidecrypt_kms_breaker_state", state="open") == 1
    assert get(samples, "sidecrypt_kms_breaker_state", state="closed") == 0
    outage = get(samples, "sidecrypt_kms_outage_seconds")
    assert outage is not None and outage > 0
