"""Branch keys against KMS (moto_server behind a counting front): the issue 19 measurement
(200 records x 3 fields with max_uses 1, then a cold list GET) costs at most one KMS Decrypt
per branch key version, on sqlite and on a real PostgreSQL; without a hierarchy every data
key is one Decrypt, resolved in one concurrent round."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cold_list import measure
from kms_counting import CountingFront
from kms_server import KmsServer

pytestmark = pytest.mark.usefixtures("aws_env")


@pytest.fixture
def kms_key(moto: KmsServer) -> dict[str, Any]:
    return moto.fresh_key("alias/app", Description="sidecrypt branch key test")


async def test_cold_list_costs_one_decrypt_per_branch_version(
    moto: KmsServer, kms_key: dict[str, Any], store_block: dict[str, Any], tmp_path: Path
) -> None:
    result = await measure(
        moto.url,
        tmp_path,
        hierarchy={"store": "main"},
        stores={"main": {**store_block, "auto_migrate": True}},
    )
    assert result["correct"], result
    assert not result["plaintext_stored"]
    assert result["kms_cold_list"].get("Decrypt", 0) == 1, result  # one branch key version
    assert result["kms_cold_list"].get("GenerateDataKey", 0) == 0
    assert result["kms_write"].get("GenerateDataKey", 0) == 1, result  # the branch key only
    assert result["warm_status"] == 200


async def test_without_hierarchy_every_data_key_is_a_decrypt(
    moto: KmsServer, kms_key: dict[str, Any], tmp_path: Path
) -> None:
    result = await measure(moto.url, tmp_path, records=40)
    assert result["correct"], result
    assert result["kms_cold_list"].get("Decrypt", 0) == 120


async def test_kms_outage_cached_branch_keys_serve_cold_sidecars_refuse(
    moto: KmsServer, kms_key: dict[str, Any], tmp_path: Path
) -> None:
    import aiohttp

    from cold_list import RecordsApp, list_records, proxy_config, start_proxy, write_records

    front = await CountingFront(moto.url).start()
    app = await RecordsApp().start()
    stops = []
    try:
        raw = proxy_config(
            app.url,
            front.url,
            hierarchy={"store": "main", "refresh": 0.2},
            stores={"main": {"type": "sqlite", "path": "store.db"}},
        )
        raw["keys"]["app"].update(timeout=1, max_attempts=1)
        warm, stop = await start_proxy(raw, tmp_path)
        stops.append(stop)
        await write_records(warm, 5)
        assert (await list_records(warm))[0] == 200
        moto.pause()  # KMS stops answering (connections hang)
        try:
            front.reset()
            await asyncio.sleep(0.3)  # past refresh: data key caches of the key expired
            await write_records(warm, 2)  # the cached branch key keeps serving writes
            status, body, _ = await list_records(warm)
            assert status == 200 and len(body["items"]) == 7
            assert front.ops == {}  # and nothing needed KMS
            cold, stop = await start_proxy(raw, tmp_path)
            stops.append(stop)
            before = len(app.records)
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{cold}/records",
                    json={"a": "1", "b": "2", "c": "3"},
                    headers={"X-Tenant": "acme"},
                ) as resp,
            ):
                assert resp.status == 503
                assert int(resp.headers["Retry-After"]) > 0
                assert (await resp.json())["error"]["code"] == "key_provider_unavailable"
            assert len(app.records) == before  # nothing reached the app
            assert (await list_records(cold))[0] == 503
        finally:
            moto.resume()
    finally:
        for stop in stops:
            await stop()
        await app.close()
        await front.close()
