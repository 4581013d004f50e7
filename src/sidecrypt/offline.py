"""Offline field transforms for the CLI: backfills, debugging, re-checking stored rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from multidict import CIMultiDict, MultiDict
from yarl import URL

from .config import Settings
from .errors import ConfigError, RequestError
from .keys import Context, DataKeyService
from .plugin_manager import build_providers, make_plugin_manager
from .proxy.fields import FieldCrypto
from .proxy.routes import CompiledRoute, Router, adhoc_route

FLAG = {"header": "--header", "path": "--route's path", "query": "--query"}


def match_route(settings: Settings, target: str) -> tuple[CompiledRoute, dict[str, str], URL]:
    """The route the proxy would pick for ``"METHOD /path?query"``, its path parameters, the URL."""
    method, _, rest = target.strip().partition(" ")
    url = URL(rest.strip())
    if not method or not rest.strip() or url.is_absolute() or not url.path.startswith("/"):
        raise ConfigError(f"--route wants 'METHOD /path', not {target!r}")
    hit = Router(settings.routes, default_max_body=1 << 62).match(method, url.path)
    if hit is None:
        raise ConfigError(f"no route matches {target!r}", file=settings.source)
    return hit[0], hit[1], url


def route_context(
    route: CompiledRoute,
    params: Mapping[str, str],
    *,
    headers: Mapping[str, str] = {},
    query: Mapping[str, str] = {},
    given: Mapping[str, str] = {},
) -> Context:
    """The context the proxy would bind for this request: computed by the proxy's own function.

    ``given`` (``--context NAME=VALUE``) supplies the value of the route's entry NAME, whatever
    its source; a literal entry cannot be changed and a name the route lacks is refused, since
    either would bind a context the proxy never computes.
    """
    hdrs: CIMultiDict[str] = CIMultiDict(headers)
    path = dict(params)
    args: MultiDict[str] = MultiDict(query)
    sources = {name: (kind, arg) for name, kind, arg in route.context_sources}
    for name, value in given.items():
        if name not in sources:
            known = ", ".join(sorted(sources)) or "none"
            raise ConfigError(
                f"--context {name}: route {route.label!r} has no context entry {name!r} "
                f"(its entries: {known})"
            )
        kind, arg = sources[name]
        if kind == "literal":
            if value != arg:
                raise ConfigError(f"--context {name}: route {route.label!r} fixes this entry")
        elif kind == "header":
            hdrs[arg] = value
        elif kind == "path":
            path[arg] = value
        else:
            args[arg] = value
    try:
        return route.context(hdrs, path, args)
    except RequestError as exc:
        missing = next((n for n in sources if repr(n) in exc.message), None)
        kind, arg = sources.get(missing or "", ("", ""))
        how = f"give {FLAG.get(kind, '--context')} {arg}=VALUE" if kind != "path" else ""
        how = how or f"give it in the --route path or as --context {missing}=VALUE"
        raise ConfigError(f"route {route.label!r}: {exc.message}; {how}") from None


async def transform_document(
    settings: Settings,
    doc: bytes,
    *,
    direction: Literal["encrypt", "decrypt"],
    route: str | None = None,
    selectors: Sequence[str] = (),
    key: str | None = None,
    context: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
) -> bytes:
    """Encrypt or decrypt one document with a route's rules (``"POST /users/1"``) or selectors.

    With a route, encrypt uses its request rules and decrypt its response rules, under the
    context the proxy would compute (``route_context``) from ``headers``, the route target's
    path and query, ``query``, and ``context`` values for named entries.
    """
    if route is None and (headers or query):
        raise ConfigError("--header and --query feed a route's context: give --route")
    if route is not None:  # usage errors before any key provider is started
        compiled, params, url = match_route(settings, route)
        ctx = route_context(
            compiled,
            params,
            headers=headers or {},
            query=MultiDict([*url.query.items(), *(query or {}).items()]),
            given=context or {},
        )
    providers = build_providers(settings, make_plugin_manager())
    service = DataKeyService(providers)
    crypto = FieldCrypto(service)
    for provider in providers.values():
        await provider.start()
    try:
        if route is not None:
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
    settings: Settings,
    doc: bytes,
    *,
    selectors: Sequence[str] = (),
    to_key: str,
    route: str | None = None,
    context: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
) -> tuple[bytes, list[tuple[str, str, int]]]:
    """Re-encrypt the tokens at ``selectors`` under ``to_key``'s newest version.

    For key rotation (old versions -> newest) and moving data to another key or provider
    (another account's KMS key, say) without the plaintext leaving this process. ``sc1.``
    tokens and ESDK messages are read alike; they are written in ``to_key``'s format.
    """
    out, moved = await rewrap_documents(
        settings,
        [doc],
        selectors=selectors,
        to_key=to_key,
        route=route,
        context=context,
        headers=headers,
        query=query,
    )
    return out[0], moved


async def rewrap_documents(
    settings: Settings,
    docs: Iterable[bytes],
    *,
    selectors: Sequence[str] = (),
    to_key: str,
    progress: Callable[[int], None] | None = None,
    route: str | None = None,
    context: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
) -> tuple[list[bytes], list[tuple[str, str, int]]]:
    """:func:`rewrap_document` over many documents (JSON Lines) with one set of providers
    and data keys; ``progress`` gets the count of documents done after each.

    With ``route`` (and the request parts that feed its context, as for encrypt), its fields
    are rewrapped and every token must be bound to the context the proxy computes for it: a
    record the proxy could not read back is refused, not moved.
    """
    if to_key not in settings.keys:
        raise ConfigError(f"unknown key {to_key!r}", file=settings.source, path="--to-key")
    expect = None
    specs = adhoc_route(to_key, selectors, any_key=True).response_decrypt
    if route is not None:
        compiled, params, url = match_route(settings, route)
        expect = route_context(
            compiled,
            params,
            headers=headers or {},
            query=MultiDict([*url.query.items(), *(query or {}).items()]),
            given=context or {},
        )
        specs = specs or compiled.request_encrypt or compiled.response_decrypt
    elif headers or query or context:
        raise ConfigError("--context, --header and --query feed a route's context: give --route")
    if not specs:
        raise ConfigError("give --route or at least one --field selector")
    providers = build_providers(settings, make_plugin_manager())
    crypto = FieldCrypto(DataKeyService(providers))
    for provider in providers.values():
        await provider.start()
    outs: list[bytes] = []
    moved: list[tuple[str, str, int]] = []
    try:
        for doc in docs:
            out, one = await crypto.rewrap_body(doc, specs, to_key=to_key, expect_context=expect)
            outs.append(out)
            moved.extend(one)
            if progress is not None:
                progress(len(outs))
        return outs, moved
    finally:
        for provider in providers.values():
            await provider.close()
