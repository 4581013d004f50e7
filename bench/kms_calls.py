"""KMS calls per 1000 requests with and without data key caching, and cache-miss latency.

Run from the repository root: ``python -m bench.kms_calls``. Starts moto_server on 127.0.0.1
(tests/kms_server.py), talks to it through the real aiobotocore client, stops it at the end.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kms_server import DUMMY_ENV, KmsServer
from sidecrypt.keys import DataKeyService, canonical_context
from sidecrypt.plugins.aws_kms import KmsKeyProvider

CTX = {"tenant": "acme", "route": "users"}
N = 1000


def _p95(xs: list[float]) -> float:
    return sorted(xs)[int(len(xs) * 0.95)]


async def main(url: str) -> None:
    options = {"provider": "kms", "key_id": "alias/app", "region": "us-east-1", "endpoint_url": url}
    provider = KmsKeyProvider.create("app", options, base_dir=Path.cwd())
    await provider.start()
    ctx = canonical_context(CTX)
    service = DataKeyService({"app": provider})
    stats = provider.stats
    g0 = stats.count("GenerateDataKey")
    for _ in range(N):
        entry = await service.for_encrypt("app", ctx, 64)
    cached_gen = stats.count("GenerateDataKey") - g0
    service.clear()
    d0 = stats.count("Decrypt")
    for _ in range(N):
        await service.for_decrypt("app", entry.wrapped, 0, ctx)
    cached_dec = stats.count("Decrypt") - d0
    gen_ms, dec_ms = [], []
    g0, d0 = stats.count("GenerateDataKey"), stats.count("Decrypt")
    for _ in range(N):
        t = time.perf_counter()
        dk = await provider.generate_data_key(CTX)
        gen_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        await provider.decrypt_data_key(dk.wrapped, 0, CTX)
        dec_ms.append((time.perf_counter() - t) * 1000)
    uncached_gen = stats.count("GenerateDataKey") - g0
    uncached_dec = stats.count("Decrypt") - d0
    print(f"GenerateDataKey per {N} encrypts: cached={cached_gen} uncached={uncached_gen}")
    print(
        f"Decrypt per {N} decrypts of one wrapped key: cached={cached_dec} uncached={uncached_dec}"
    )
    print(
        f"cache-miss GenerateDataKey vs moto: median {statistics.median(gen_ms):.2f} ms, "
        f"p95 {_p95(gen_ms):.2f} ms"
    )
    print(
        f"cache-miss Decrypt vs moto:         median {statistics.median(dec_ms):.2f} ms, "
        f"p95 {_p95(dec_ms):.2f} ms"
    )
    await provider.close()


if __name__ == "__main__":
    os.environ.update(DUMMY_ENV)
    with KmsServer() as kms:
        kms.create_key(alias="alias/app")
        asyncio.run(main(kms.url))
