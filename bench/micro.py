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
    # The issue-16 JSON checks encrypt_body runs on every body (transform/).
    from sidecrypt.transform.duplicates import check_duplicates

    guard = specs.guard  # type: ignore[attr-defined]
    sealed = dict(doc, **{s.members[-1]: "sc1." + "A" * 60 for s in specs if s.members})
    out["duplicate-key check, 1 KB body (µs)"] = _best_us(lambda: check_duplicates(body, doc), n)
    out["guard scan, 1 KB body (µs)"] = _best_us(lambda: guard.find_slots(doc), n)
    out["guard last check, 1 KB body (µs)"] = _best_us(lambda: guard.check_outgoing(sealed), n)
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
    from .env import _encrypt

    enc_doc = await _encrypt(config, body)  # the upstream's answer, as in the bench
    out["encrypting route work per request (µs)"] = await route_work(
        config, body, enc_doc, number=n // 4
    )
    from .micro_esdk import figures

    out.update(await figures(n // 5))  # esdk against sc1 per field, and the official SDK
    return out


def run(config: Path, body: bytes, *, quick: bool = False) -> dict[str, float]:
    return asyncio.run(_run(config, body, quick))


# -- the encrypting route's own work per request, outside HTTP I/O --------------------------


async def route_work(
    config: Path, body: bytes, enc_body: bytes, *, number: int, profiler: Any = None
) -> float:
    """µs per request of everything the proxy does for one ``/records/1`` request besides HTTP.

    The real app (``create_app`` on the bench config) and its ``Proxy``; per request: a fresh
    mocked request with the bench headers, request id, identify, audit gate, context,
    ``_transform_request``, then the response block of ``Proxy._respond_transformed`` (decrypt
    with the Decider, its audit events). Routing, header rules, body reading and the response
    object are the same on the pass-through path and left out. Keep ``_respond`` in step with
    the ``if route.response_decrypt:`` block of ``Proxy._respond_transformed``.
    """
    from aiohttp.test_utils import make_mocked_request

    from sidecrypt import appkeys
    from sidecrypt import config as cfg
    from sidecrypt.plugin_manager import make_plugin_manager
    from sidecrypt.proxy.app import PROXY_KEY, create_app

    settings = cfg.load(config)
    app = create_app(settings, make_plugin_manager())
    proxy = app[PROXY_KEY]
    for p in proxy.keys.providers.values():
        await p.start()
    match = proxy.router.match("POST", ENC_PATH)
    assert match is not None
    route, params = match
    headers = {"Content-Type": "application/json", "X-Tenant": "acme", "Host": "127.0.0.1"}

    async def one(request: Any) -> bytes:
        rid = request.headers.get("X-Request-Id", "")
        if not 0 < len(rid) <= 128:
            rid = f"{proxy._id_prefix}-{next(proxy._ids)}"
        request[appkeys.REQUEST_ID] = rid
        request[appkeys.ROUTE] = route.label
        proxy._identify_caller(request)
        if not proxy.audit_gate():
            raise RuntimeError("audit gate closed")
        context = route.context(request.headers, params, request.query)
        await proxy._transform_request(request, route, body, context)
        return await _respond(proxy, request, route, context, enc_body)

    out = await one(make_mocked_request("POST", ENC_PATH, headers=headers))
    if orjson.loads(out) != orjson.loads(body):
        raise RuntimeError("route_work: the decrypted response differs from the request body")
    best = float("inf")
    for _ in range(5):
        requests = [make_mocked_request("POST", ENC_PATH, headers=headers) for _ in range(number)]
        if profiler is not None:
            profiler.enable()
        t = time.perf_counter()
        for request in requests:
            await one(request)
        best = min(best, time.perf_counter() - t)
        if profiler is not None:
            profiler.disable()
    for p in proxy.keys.providers.values():
        await p.close()
    return best / number * 1e6


async def _respond(proxy: Any, request: Any, route: Any, context: Any, body: bytes) -> bytes:
    """The ``if route.response_decrypt:`` block of ``Proxy._respond_transformed``."""
    from sidecrypt import appkeys

    decide = proxy._decider(request, route)
    body, labels, outcomes = await proxy.fields.decrypt_body(
        body, route, route.response_decrypt, context, decide=decide
    )
    proxy._field_event("decrypt_fields", request, route, context, labels)
    rid = request[appkeys.REQUEST_ID]
    for event in decide.audit_events(request_id=rid, context=dict(context)):
        proxy.audit(event)
    for label, outcome in outcomes:
        if outcome == "error":
            proxy._field_event("reveal", request, route, context, [label], outcome=outcome)
    return body


def _standalone(number: int) -> None:
    """``python -m bench.micro``: the route-work figure without nginx or wrk."""
    import subprocess
    import sys
    import tempfile

    from .env import PORTS, _encrypt, body_doc, sidecrypt_config

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cli = [sys.executable, "-m", "sidecrypt.cli"]
        subprocess.run([*cli, "certs", "dev", tmp], check=True, capture_output=True)
        keyring = d / "keyring.json"
        subprocess.run(
            [*cli, "keys", "create", "--keyring", str(keyring), "app"],
            check=True,
            capture_output=True,
        )
        keyring.chmod(0o600)
        config = sidecrypt_config(d, 1, PORTS["sidecrypt-1"])
        body = orjson.dumps(body_doc())
        enc_body = asyncio.run(_encrypt(config, body))
        if number <= 0:  # every figure, as the bench prints them
            for name, us in run(config, body).items():
                print(f"{name}: {us:.2f}")
            return
        us = asyncio.run(route_work(config, body, enc_body, number=number))
        print(f"encrypting route work per request (µs): {us:.1f}")


if __name__ == "__main__":
    import sys

    # python -m bench.micro [N]: the route-work figure over N requests; N = 0: all figures
    _standalone(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
