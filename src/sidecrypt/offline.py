"""Offline field transforms for the CLI: backfills, debugging, re-checking stored rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from .config import Settings
from .errors import ConfigError
from .keys import DataKeyService, canonical_context
from .plugin_manager import build_providers, make_plugin_manager
from .proxy.fields import FieldCrypto
from .proxy.routes import Router, adhoc_route


async def transform_document(
    settings: Settings,
    doc: bytes,
    *,
    direction: Literal["encrypt", "decrypt"],
    route: str | None = None,
    selectors: Sequence[str] = (),
    key: str | None = None,
    context: Mapping[str, str] | None = None,
) -> bytes:
    """Encrypt or decrypt one document with a route's rules (``"POST /users/1"``) or selectors.

    With a route, encrypt uses its request rules and decrypt its response rules; ``context``
    is the resolved encryption context (what the route would have taken from the request).
    """
    providers = build_providers(settings, make_plugin_manager())
    service = DataKeyService(providers)
    crypto = FieldCrypto(service)
    for provider in providers.values():
        await provider.start()
    try:
        if route is not None:
            method, _, path = route.partition(" ")
            hit = Router(settings.routes, default_max_body=1 << 62).match(method, path or "/")
            if hit is None:
                raise ConfigError(f"no route matches {route!r}", file=settings.source)
            compiled = hit[0]
            ctx = canonical_context(context or {})
            if direction == "encrypt":
                out, _ = await crypto.encrypt_body(doc, compiled, compiled.request_encrypt, ctx)
            else:
                out, _, _ = await crypto.decrypt_body(doc, compiled, compiled.response_decrypt, ctx)
            return out
        if not selectors:
            raise ConfigError("give --route or at least one --field selector")
        if key is None:
            if len(settings.keys) != 1:
                raise ConfigError("give --key: the config has more than one key")
            key = next(iter(settings.keys))
        return await crypto.transform_document(
            doc,
            action=direction,
            key=key,
            selectors=selectors,
            context=context,
            any_key=direction == "decrypt",
        )
    finally:
        for provider in providers.values():
            await provider.close()


def with_format(settings: Settings, key: str | None, fmt: str | None) -> Settings:
    """``--format``: write under ``key`` as ``sc1`` or ``esdk`` whatever its config says."""
    if fmt is None or key is None:
        return settings
    if key not in settings.keys:
        raise ConfigError(f"unknown key {key!r}", file=settings.source, path="--key")
    keys = {**settings.keys, key: {**settings.keys[key], "format": fmt}}
    return settings.model_copy(update={"keys": keys})


async def rewrap_document(
    settings: Settings, doc: bytes, *, selectors: Sequence[str], to_key: str
) -> tuple[bytes, list[tuple[str, str, int]]]:
    """Re-encrypt the tokens at ``selectors`` under ``to_key``'s newest version.

    For key rotation (old versions -> newest) and moving data to another key or provider
    (another account's KMS key, say) without the plaintext leaving this process. ``sc1.``
    tokens and ESDK messages are read alike; they are written in ``to_key``'s format.
    """
    out, moved = await rewrap_documents(settings, [doc], selectors=selectors, to_key=to_key)
    return out[0], moved


async def rewrap_documents(
    settings: Settings,
    docs: Iterable[bytes],
    *,
    selectors: Sequence[str],
    to_key: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[bytes], list[tuple[str, str, int]]]:
    """:func:`rewrap_document` over many documents (JSON Lines) with one set of providers
    and data keys; ``progress`` gets the count of documents done after each."""
    if to_key not in settings.keys:
        raise ConfigError(f"unknown key {to_key!r}", file=settings.source, path="--to-key")
    providers = build_providers(settings, make_plugin_manager())
    crypto = FieldCrypto(DataKeyService(providers))
    for provider in providers.values():
        await provider.start()
    outs: list[bytes] = []
    moved: list[tuple[str, str, int]] = []
    try:
        specs = adhoc_route(to_key, selectors, any_key=True).response_decrypt
        for doc in docs:
            out, one = await crypto.rewrap_body(doc, specs, to_key=to_key)
            outs.append(out)
            moved.extend(one)
            if progress is not None:
                progress(len(outs))
        return outs, moved
    finally:
        for provider in providers.values():
            await provider.close()
