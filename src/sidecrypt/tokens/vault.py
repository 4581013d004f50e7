"""The token vault: tokenize and detokenize through a store, a key provider and a cache.

A value's token is stored with the value sealed as an ``sc1.`` envelope (the route's key
through the data key service: AES-256-GCM, AAD = header with the encryption context + a label
naming the format and the token), so a row altered, or moved to another token, format or
context, fails to open. Consistent tokens are found through the keyed blind index; the first
write of a value inserts candidates in a fixed order (the next when a candidate is another
value's token) and reads back the token stored for the index, so racing sidecars agree.
A store or provider failure is an error for the request (503): nothing is left unprotected.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from .. import keys as keymod
from ..envelope import build_header, decrypt_value, dumps_json, parse, seal
from ..errors import CryptoError, SidecryptError
from ..events import AuditEvent
from ..stores.base import StoreError
from .cache import MISSING, TokenCache
from .formats import TokenFormat, TokenFormatError, TokenSpaceError
from .index import TokenKeys, encode_parts
from .roots import load_root
from .stream import RandomSource, Sampler
from .table import VaultEntry, VaultTable

MAX_ATTEMPTS = 64  # candidates per value before the vault gives up (never near: spaces >= 5e5
# and a collision needs another value's token at exactly this candidate)
INSERT_CONCURRENCY = 16

AuditFn = Callable[[AuditEvent], None]


def _no_audit(event: AuditEvent) -> None:
    return None


@lru_cache(maxsize=4096)
def context_text(context: keymod.Context) -> str:
    """The canonical text of an encryption context, as stored in vault rows."""
    return json.dumps([list(pair) for pair in context], ensure_ascii=False, separators=(",", ":"))


@lru_cache(maxsize=4096)
def _scope(name: str, signature: str, ctx: str) -> bytes:
    """The blind index's scope: key, format and context (length-prefixed)."""
    return encode_parts((name.encode(), signature.encode(), ctx.encode()))


def token_label(signature: str, token: str) -> str:
    """The AAD label of a sealed value: binds the row to its format and token."""
    return f"token:{signature}:{token}"


def parse_context(text: str) -> keymod.Context:
    """The inverse of :func:`context_text`."""
    pairs = json.loads(text)
    return tuple((str(k), str(v)) for k, v in pairs)


class Vault:
    """One per app: tokens for every route, on the configured store."""

    def __init__(
        self,
        table: VaultTable | None,
        keys: keymod.DataKeyService,
        *,
        cache_entries: int = 100_000,
        cache_ttl: float = 300.0,
        audit: AuditFn = _no_audit,
    ) -> None:
        self._table = table
        self.keys = keys
        self.audit = audit
        self.cache = TokenCache(cache_entries, cache_ttl)
        self._roots: dict[str, TokenKeys] = {}
        self._root_locks: dict[str, asyncio.Lock] = {}
        self.stats: dict[str, int] = {"store_calls": 0, "tokenized": 0, "detokenized": 0}
        # Store calls by (operation, "ok"|"error") and their seconds by operation (metrics).
        self.calls: dict[tuple[str, str], int] = {}
        self.seconds: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"Vault(cache={self.cache!r})"

    @property
    def table(self) -> VaultTable:
        if self._table is None:
            raise StoreError("the token vault's store is not started")
        return self._table

    @table.setter
    def table(self, table: VaultTable | None) -> None:
        self._table = table

    # -- the root of a key's blind index ----------------------------------------------------

    async def token_keys(self, name: str) -> TokenKeys:
        found = self._roots.get(name)
        if found is not None:
            return found
        lock = self._root_locks.setdefault(name, asyncio.Lock())
        async with lock:
            found = self._roots.get(name)
            if found is None:
                found = self._roots[name] = await load_root(self, name)
        return found

    async def store_call(self, op: str, call: Any) -> Any:
        started = time.perf_counter()
        ok = False
        try:
            result = await call
            ok = True
            return result
        except SidecryptError:
            raise
        except Exception as exc:  # a backend that let a driver error through: still a 503
            raise StoreError(f"the token vault's {op} failed ({type(exc).__name__})") from exc
        finally:
            seconds = time.perf_counter() - started
            self.stats["store_calls"] += 1
            outcome = (op, "ok" if ok else "error")
            self.calls[outcome] = self.calls.get(outcome, 0) + 1
            self.seconds[op] = self.seconds.get(op, 0.0) + seconds

    # -- tokenize ---------------------------------------------------------------------------

    async def tokenize(
        self,
        name: str,
        context: keymod.Context,
        items: Sequence[tuple[TokenFormat, bool, Any]],
        labels: Sequence[str] | None = None,
    ) -> list[Any]:
        """Tokens for (format, consistent, value) items, in order. Consistent values the
        cache does not hold are looked up in one store call; new ones are inserted.
        ``labels`` name the items in errors (a value that does not fit: TokenFormatError)."""
        ctx = context_text(context)
        out: list[Any] = [None] * len(items)
        cache = self.cache
        misses = []
        for i, (fmt, consistent, value) in enumerate(items):
            # Hot path: a consistent value tokenized before (only values that fit their format
            # are ever cached, so no parse is needed); the JSON type is part of the key.
            if consistent:
                hit = cache.get(("t", name, fmt.signature, ctx, type(value), value))
                if hit is not MISSING:
                    out[i] = hit
                    continue
            misses.append(i)
        self.stats["tokenized"] += len(items)
        if not misses:
            return out
        tk = await self.token_keys(name)
        todo: dict[bytes, list[int]] = {}  # consistent: bidx -> item positions
        parsed_at: dict[int, Any] = {}
        randoms: list[int] = []
        for i in misses:
            fmt, consistent, value = items[i]
            try:
                parsed = fmt.parse(value)
                fmt.check_space(parsed, "consistent" if consistent else "random")
            except TokenFormatError as exc:
                if labels is None:
                    raise
                raise type(exc)(f"{labels[i]}: {exc.message}") from None
            parsed_at[i] = parsed
            if not consistent:
                randoms.append(i)
                continue
            bidx = tk.blind_index(_scope(name, fmt.signature, ctx), fmt.index_bytes(parsed))
            todo.setdefault(bidx, []).append(i)
        if todo:
            found = await self.store_call("by_index", self.table.by_index(list(todo)))
            new: list[tuple[bytes, list[int]]] = []
            for bidx, where in todo.items():
                text = found.get(bidx)
                if text is None:
                    new.append((bidx, where))
                else:
                    self._remember(name, ctx, items, parsed_at, bidx, where, text)
                    for i in where:
                        out[i] = self._typed(parsed_at[i], text)
            if new:
                sem = asyncio.Semaphore(INSERT_CONCURRENCY)

                async def first_write(bidx: bytes, where: list[int]) -> None:
                    i = where[0]
                    fmt, _, value = items[i]
                    async with sem:
                        text = await self._insert_consistent(
                            name, context, ctx, tk, fmt, parsed_at[i], value, bidx
                        )
                    self._remember(name, ctx, items, parsed_at, bidx, where, text)
                    for j in where:
                        out[j] = self._typed(parsed_at[j], text)

                await asyncio.gather(*(first_write(b, w) for b, w in new))
        for i in randoms:
            fmt, _, value = items[i]
            out[i] = await self._insert_random(name, context, ctx, fmt, parsed_at[i], value)
        return out

    @staticmethod
    def _typed(parsed: Any, text: str) -> Any:
        return int(text) if parsed.kind == "int" else text

    def _remember(
        self,
        name: str,
        ctx: str,
        items: Sequence[tuple[TokenFormat, bool, Any]],
        parsed_at: dict[int, Any],
        bidx: bytes,
        where: list[int],
        text: str,
    ) -> None:
        for i in where:
            fmt, _, value = items[i]
            token = self._typed(parsed_at[i], text)
            self.cache.put(("t", name, fmt.signature, ctx, type(value), value), token)
        self.cache.put(("v", name, fmt.signature, ctx, text), value)

    async def seal_value(
        self, name: str, context: keymod.Context, signature: str, token: str, value: Any
    ) -> tuple[str, int]:
        """The value sealed under the key's current data key: (sc1 text, key version)."""
        plain = dumps_json(value)
        cached = self.keys.cached_for_encrypt(name, context, len(plain))
        if cached is None:
            cached = await self.keys.for_encrypt(name, context, len(plain))
        header = build_header(
            cached.provider.type_name, name, cached.key_version, context, cached.wrapped
        )
        return seal(plain, cached.aead, header=header, label=token_label(signature, token)), (
            cached.key_version
        )

    async def _insert_consistent(
        self,
        name: str,
        context: keymod.Context,
        ctx: str,
        tk: TokenKeys,
        fmt: TokenFormat,
        parsed: Any,
        value: Any,
        bidx: bytes,
    ) -> str:
        for attempt in range(MAX_ATTEMPTS):
            text = str(fmt.render(parsed, tk.sampler(bidx, attempt)))
            sealed, kek = await self.seal_value(name, context, fmt.signature, text, value)
            entry = VaultEntry(name, fmt.signature, ctx, text, bidx, sealed, kek, time.time())
            stored = await self.store_call("insert", self.table.insert(entry))
            if stored is not None:
                return str(stored)
        raise TokenSpaceError(f"no free {fmt.name} token after {MAX_ATTEMPTS} candidates")

    async def _insert_random(
        self,
        name: str,
        context: keymod.Context,
        ctx: str,
        fmt: TokenFormat,
        parsed: Any,
        value: Any,
    ) -> Any:
        for _ in range(MAX_ATTEMPTS):
            token = fmt.render(parsed, Sampler(RandomSource()))
            text = str(token)
            sealed, kek = await self.seal_value(name, context, fmt.signature, text, value)
            entry = VaultEntry(name, fmt.signature, ctx, text, None, sealed, kek, time.time())
            if await self.store_call("insert", self.table.insert(entry)) is not None:
                self.cache.put(("v", name, fmt.signature, ctx, text), value)
                return token
        raise TokenSpaceError(f"no free {fmt.name} token after {MAX_ATTEMPTS} candidates")

    # -- detokenize -------------------------------------------------------------------------

    async def detokenize(
        self, name: str, context: keymod.Context, items: Sequence[tuple[TokenFormat, Any]]
    ) -> list[Any]:
        """Values for (format, token) items, in order; :data:`MISSING` where the vault has no
        such token (never tokenized here, or forgotten). All misses of the cache cost one
        store call. A row that does not open raises CryptoError (fail closed)."""
        ctx = context_text(context)
        out: list[Any] = [MISSING] * len(items)
        todo: dict[str, list[int]] = {}
        for i, (fmt, token) in enumerate(items):
            text = str(token)
            hit = self.cache.get(("v", name, fmt.signature, ctx, text))
            if hit is not MISSING:
                out[i] = hit
            else:
                todo.setdefault(text, []).append(i)
        if todo:
            rows = await self.store_call("by_tokens", self.table.by_tokens(name, ctx, list(todo)))
            by_key = {(sig, token): sealed for sig, token, sealed in rows}
            for text, where in todo.items():
                for i in where:
                    fmt = items[i][0]
                    sealed = by_key.get((fmt.signature, text))
                    if sealed is None:
                        continue
                    value = await self.open(name, context, fmt.signature, text, sealed)
                    self.cache.put(("v", name, fmt.signature, ctx, text), value)
                    out[i] = value
        self.stats["detokenized"] += len(items)
        return out

    async def open(
        self, name: str, context: keymod.Context, signature: str, token: str, sealed: str
    ) -> Any:
        """Authenticate and decrypt one vault row (its key, context, format and token)."""
        label = f"token {signature.split(';', 1)[0]}"
        env = parse(sealed)
        if env.key_name != name:
            raise CryptoError(f"a vault row for {label} is sealed under another key")
        if env.context != context:
            raise CryptoError(
                f"a vault row for {label} is bound to another context", code="context_mismatch"
            )
        aead = self.keys.cached_for_decrypt(env.wrapped)
        if aead is None:
            aead = await self.keys.for_decrypt(
                env.key_name, env.wrapped, env.key_version, env.context
            )
        try:
            return decrypt_value(env, aead, token_label(signature, token))
        except CryptoError:
            raise CryptoError(
                f"a vault row for {label} does not authenticate (altered, or moved from "
                "another token, format or context)",
                code="vault_tampered",
            ) from None
