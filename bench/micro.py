"""Micro benchmarks of the per-request field work, on the bench's 1 KB body, in-process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from .env import CONTEXT, ENC_PATH


def _best_us(fn: Callable[[], Any], number: int, repeat: int = 5) -> float:
    """Best of ``repeat`` runs, µs per call: the least-disturbed figure on a shared machine."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, time.perf_counter() - t)
    return best / number * 1e6


async def _run(config: Path, body: bytes, quick: bool) -> dict[str, float]:
    from sidecrypt import config as cfg
    from sidecrypt.envelope import build_header, decrypt_value, dumps_json, loads_json, parse, seal
    from sidecrypt.keys import DataKeyService, canonical_context
    from sidecrypt.plugin_manager import build_providers, make_plugin_manager
    from sidecrypt.proxy.fields import FieldCrypto, _collect
    from sidecrypt.proxy.routes import Router

    n = 2000 if quick else 10000
    settings = cfg.load(config)
    providers = build_providers(settings, make_plugin_manager())
    for p in providers.values():
        await p.start()
    service = DataKeyService(providers)
    crypto = FieldCrypto(service)
    route = Router(settings.routes, default_max_body=1 << 20).match("POST", ENC_PATH)[0]  # type: ignore[index]
    ctx = canonical_context(CONTEXT)
    specs = route.request_encrypt
    doc = loads_json(body)
    out: dict[str, float] = {}

    # One field, as encrypt_body does it: serialise, cached data key, header, seal.
    dk = await service.for_encrypt("app", ctx, 32)
    provider = dk.provider.type_name

    def enc_field() -> str:
        plain = dumps_json("078-05-1120")
        key = service.cached_for_encrypt("app", ctx, len(plain))
        assert key is not None
        header = build_header(provider, "app", key.key_version, ctx, key.wrapped)
        return seal(plain, key.aead, header=header, label="ssn")

    token = enc_field()

    def dec_field() -> Any:
        env = parse(token)
        aead = service.cached_for_decrypt(env.wrapped)
        assert aead is not None
        return decrypt_value(env, aead, "ssn")

    await crypto.open_token(token, route, ctx, "ssn")  # unwrap once: cached from here on
    out["encrypt one field (µs)"] = _best_us(enc_field, n)
    out["decrypt one field (µs)"] = _best_us(dec_field, n)
    out["select 3 fields in the 1 KB body (µs)"] = _best_us(
        lambda: _collect(doc, specs, encrypting=True), n
    )
    out["parse 1 KB body, orjson (µs)"] = _best_us(lambda: loads_json(body), n)
    out["serialise 1 KB body, orjson (µs)"] = _best_us(lambda: orjson.dumps(doc), n)
    out["parse 1 KB body, stdlib json (µs)"] = _best_us(lambda: json.loads(body), n)
    out["serialise 1 KB body, stdlib json (µs)"] = _best_us(lambda: json.dumps(doc).encode(), n)

    async def whole(fn: Callable[[], Any], number: int) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(number):
                await fn()
            best = min(best, time.perf_counter() - t)
        return best / number * 1e6

    enc_body, _ = await crypto.encrypt_body(body, route, specs, ctx)
    out["encrypt_body: 1 KB, 3 fields (µs)"] = await whole(
        lambda: crypto.encrypt_body(body, route, specs, ctx), n // 2
    )
    out["decrypt_body: 1 KB, 3 fields (µs)"] = await whole(
        lambda: crypto.decrypt_body(enc_body, route, route.response_decrypt, ctx), n // 2
    )
    for p in providers.values():
        await p.close()
    return out


def run(config: Path, body: bytes, *, quick: bool = False) -> dict[str, float]:
    return asyncio.run(_run(config, body, quick))
