"""Branch keys against KMS (moto_server behind a counting front): the issue 19 measurement
(200 records x 3 fields with max_uses 1, then a cold list GET) costs at most one KMS Decrypt
per branch key version, on sqlite and on a real PostgreSQL; without a hierarchy every data
key is one Decrypt, resolved in one concurrent round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cold_list import measure
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
