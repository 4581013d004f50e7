"""Token costs, in-process, on a sqlite vault: ``python -m bench.tokens``.

Prints µs per tokenized field (warm cache, and cold: a first write), the same 3-field body
tokenized vs encrypted by the proxy's body transforms, and the store round trips and time of
detokenizing a 1,000-token list on a cold cache. Figures go into the closing note of issue 18.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

BODY = {
    "ssn": "078-05-1120",
    "email": "ada.lovelace@example.com",
    "phone": "442079460958",
    "name": "Ada",
}


async def _timed(fn: Any, number: int, repeat: int = 5) -> float:
    """Best of ``repeat`` runs, µs per call."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            await fn()
        best = min(best, time.perf_counter() - t)
    return best / number * 1e6


async def run(d: Path) -> dict[str, float]:
    from sidecrypt import config
    from sidecrypt.keyring import create_key
    from sidecrypt.keys import DataKeyService, canonical_context
    from sidecrypt.plugin_manager import build_providers, build_stores, make_plugin_manager
    from sidecrypt.proxy.fields import FieldCrypto
    from sidecrypt.proxy.routes import Router
    from sidecrypt.proxy.tokenize import TokenFields
    from sidecrypt.tokens.formats import build_format
    from sidecrypt.tokens.table import vault_table
    from sidecrypt.tokens.vault import Vault

    create_key(d / "keyring.json", "app")
    fields = [
        {"path": "$.ssn", "format": "ssn", "consistent": True},
        {"path": "$.email", "format": "email", "consistent": True},
        {"path": "$.phone", "format": "digits", "consistent": True},
    ]
    raw = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "keys": {"app": {"provider": "local", "keyring": str(d / "keyring.json"), "key": "app"}},
        "stores": {"vault": {"type": "sqlite", "path": "vault.db", "auto_migrate": True}},
        "routes": [
            {"match": {"path": "/t"}, "key": "app", "request": {"tokenize": fields}},
            {
                "match": {"path": "/e"},
                "key": "app",
                "request": {"encrypt": [f["path"] for f in fields]},
            },
        ],
    }
    settings = config.parse(raw, base_dir=d)
    pm = make_plugin_manager(entry_points=False)
    store = build_stores(settings, pm)["vault"]
    providers = build_providers(settings, pm)
    await store.start()
    for p in providers.values():
        await p.start()
    keys = DataKeyService(providers)
    vault = Vault(vault_table(store), keys)
    router = Router(settings.routes, default_max_body=1 << 20)
    troute = router.match("POST", "/t")[0]  # type: ignore[index]
    eroute = router.match("POST", "/e")[0]  # type: ignore[index]
    ctx = canonical_context({"tenant": "acme"})
    tokens = TokenFields(vault)
    crypto = FieldCrypto(keys)
    body = orjson.dumps(BODY)
    out: dict[str, float] = {}
    try:
        ssn = build_format("ssn", {}, consistent=True)
        await vault.tokenize("app", ctx, [(ssn, True, "078-05-1120")])
        out["tokenize 1 field, warm cache (µs)"] = await _timed(
            lambda: vault.tokenize("app", ctx, [(ssn, True, "078-05-1120")]), 2000
        )
        counter = iter(range(10**9))

        async def cold() -> Any:
            i = next(counter)
            return await vault.tokenize(
                "app",
                ctx,
                [(ssn, True, f"{i // 10000 % 1000:03d}-{i // 100 % 100:02d}-{i % 10000:04d}")],
            )

        out["tokenize 1 field, first write to sqlite (µs)"] = await _timed(cold, 200, repeat=3)
        rules = troute.tokens.request_tokenize
        await tokens.tokenize_body(body, "app", rules, ctx)
        out["body of 3 fields: tokenize, warm (µs)"] = await _timed(
            lambda: tokens.tokenize_body(body, "app", rules, ctx), 2000
        )
        await crypto.encrypt_body(body, eroute, eroute.request_encrypt, ctx)
        out["body of 3 fields: encrypt (µs)"] = await _timed(
            lambda: crypto.encrypt_body(body, eroute, eroute.request_encrypt, ctx), 2000
        )
        values = [f"{i:09d}" for i in range(100_000_000, 100_001_000)]
        made = await vault.tokenize("app", ctx, [(ssn, True, v) for v in values])
        reader = Vault(vault_table(store), keys)
        await reader.token_keys("app")
        calls = reader.stats["store_calls"]
        t = time.perf_counter()
        got = await reader.detokenize("app", ctx, [(ssn, tok) for tok in made])
        out["1,000-token list detokenize, cold cache (ms)"] = (time.perf_counter() - t) * 1e3
        out["1,000-token list detokenize: store round trips"] = reader.stats["store_calls"] - calls
        assert got == values
        t = time.perf_counter()
        await reader.detokenize("app", ctx, [(ssn, tok) for tok in made])
        out["1,000-token list detokenize, warm cache (ms)"] = (time.perf_counter() - t) * 1e3
    finally:
        for p in providers.values():
            await p.close()
        await store.close()
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, value in asyncio.run(run(Path(tmp))).items():
            print(f"{name:50} {value:10.1f}")


if __name__ == "__main__":
    main()
