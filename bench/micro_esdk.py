"""Per-field cost of the ``esdk`` format against ``sc1.``, and of the official SDK.

``python -m bench.micro_esdk [N]`` prints the table; ``python -m bench.micro 0`` includes it.
All keys local (raw AES layout for esdk), data keys cached as on the proxy's hot path, one
11-byte JSON string per field. The official ``aws-encryption-sdk`` figures (if installed) use a
raw AES master key provider without a cache: its per-message wrap is part of its cost.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .env import CONTEXT

VALUE = b'"078-05-1120"'


async def _best_async(fn: Callable[[], Awaitable[Any]], number: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            await fn()
        best = min(best, time.perf_counter() - t)
    return best / number * 1e6


def _best(fn: Callable[[], Any], number: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, time.perf_counter() - t)
    return best / number * 1e6


async def figures(number: int = 2000) -> dict[str, float]:
    from sidecrypt import keyring
    from sidecrypt.envelope import build_header, decrypt_value, parse, seal
    from sidecrypt.keys import DataKeyService, canonical_context
    from sidecrypt.plugins.local_keys import LocalKeyProvider
    from sidecrypt.proxy.fields import FieldCrypto

    out: dict[str, float] = {}
    ctx = canonical_context(CONTEXT)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keyring.json"
        keyring.create_key(path, "app")
        material = keyring.load(path).keys["app"].primary.material
        blocks = {
            "sc1": {"format": "sc1"},
            "esdk": {"format": "esdk"},
            "signed": {
                "format": "esdk",
                "esdk": {"suite": "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384"},
            },
        }
        providers = {}
        for name, extra in blocks.items():
            block = {"provider": "local", "keyring": str(path), "key": "app", **extra}
            providers[name] = LocalKeyProvider.create(name, block, base_dir=Path(tmp))
            await providers[name].start()
        service = DataKeyService(providers)
        crypto = FieldCrypto(service)

        dk = await service.for_encrypt("sc1", ctx, 32)

        def sc1_enc() -> str:
            key = service.cached_for_encrypt("sc1", ctx, len(VALUE))
            assert key is not None
            header = build_header("local", "sc1", key.key_version, ctx, key.wrapped)
            return seal(VALUE, key.aead, header=header, label="ssn")

        token = sc1_enc()
        await crypto.keys.for_decrypt("sc1", dk.wrapped, dk.key_version, ctx)

        def sc1_dec() -> Any:
            env = parse(token)
            aead = service.cached_for_decrypt(env.wrapped)
            assert aead is not None
            return decrypt_value(env, aead, "ssn")

        out["sc1 encrypt one field (µs)"] = _best(sc1_enc, number)
        out["sc1 decrypt one field (µs)"] = _best(sc1_dec, number)
        for name in ("esdk", "signed"):
            n = number if name == "esdk" else max(number // 10, 50)
            msg = await crypto.esdk.seal(name, ctx, "ssn", VALUE)
            await crypto.esdk.open(msg, label="ssn", context=ctx, allowed=None)
            out[f"{name} encrypt one field (µs)"] = await _best_async(
                lambda name=name: crypto.esdk.seal(name, ctx, "ssn", VALUE),
                n,  # type: ignore[misc]
            )
            out[f"{name} decrypt one field (µs)"] = await _best_async(
                lambda msg=msg: crypto.esdk.open(msg, label="ssn", context=ctx, allowed=None),  # type: ignore[misc]
                n,
            )
        for p in providers.values():
            await p.close()
        assert material is not None
        out.update(_official(material, max(number // 10, 50)))
    return out


def _official(material: bytes, number: int) -> dict[str, float]:
    try:
        import aws_encryption_sdk
        from aws_encryption_sdk.identifiers import (
            Algorithm,
            CommitmentPolicy,
            EncryptionKeyType,
            WrappingAlgorithm,
        )
        from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider, WrappingKey
    except ImportError:
        return {}

    class Provider(RawMasterKeyProvider):  # type: ignore[misc]
        provider_id = "sidecrypt"

        def _get_raw_key(self, key_id: bytes) -> Any:
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=material,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    keys = Provider()
    keys.add_master_key(b"app")
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
    )
    out = {}
    suites = {
        "official SDK": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        "official SDK signed": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
    }
    for name, alg in suites.items():

        def enc(alg: Any = alg) -> bytes:
            ct, _ = client.encrypt(
                source=VALUE, key_provider=keys, encryption_context=CONTEXT, algorithm=alg
            )
            return bytes(ct)

        message = enc()
        out[f"{name} encrypt one field (µs)"] = _best(enc, number)
        out[f"{name} decrypt one field (µs)"] = _best(
            lambda m=message: client.decrypt(source=m, key_provider=keys), number
        )
    return out


if __name__ == "__main__":
    import sys

    for label, us in asyncio.run(figures(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)).items():
        print(f"{label}: {us:.1f}")
