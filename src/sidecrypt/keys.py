"""Key providers and the data key service in front of them.

A *key provider* holds key-encryption keys (a local keyring, AWS KMS, ...) and wraps/unwraps
32-byte data keys. The :class:`DataKeyService` sits between the proxy and the providers: it caches
data keys within limits (ESDK caching-CMM semantics), lets concurrent requests for the same key
share one provider call, never caches failures, checks sizes, and turns every provider failure
into :class:`~sidecrypt.errors.KeyProviderError`. This module knows no HTTP and no provider.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict

from .crypto.hierarchy.options import HierarchyOptions
from .errors import CryptoError, KeyProviderError, SidecryptError
from .events import AuditEvent

DATA_KEY_BYTES = 32
MAX_WRAPPED_BYTES = 4096

Context = tuple[tuple[str, str], ...]
"""An encryption context in canonical form: pairs sorted by name."""


def canonical_context(context: Mapping[str, str]) -> Context:
    return tuple(sorted(context.items()))


class DataKey:
    """A plaintext data key and its wrapped form. The key bytes never appear in a repr."""

    __slots__ = ("key_version", "plaintext", "wrapped")

    def __init__(self, plaintext: bytes, wrapped: bytes, key_version: int = 0) -> None:
        self.plaintext = plaintext
        self.wrapped = wrapped
        self.key_version = key_version

    def __repr__(self) -> str:
        return f"DataKey(key_version={self.key_version}, wrapped=<{len(self.wrapped)} bytes>)"


class ProviderOptions(BaseModel):
    """Base for a provider's config block; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    provider: str
    hierarchy: HierarchyOptions | None = None
    """Branch keys (crypto/hierarchy): the provider wraps branch keys, not data keys."""


@runtime_checkable
class KeyProvider(Protocol):
    """One configured key (``keys.<name>`` in the config) backed by some key store.

    Providers are plain classes returned by the ``sidecrypt_key_provider_types`` hook. The config
    picks one by ``type_name`` and builds it with :meth:`create`. All I/O is async.
    """

    type_name: ClassVar[str]
    options_model: ClassVar[type[ProviderOptions]]
    name: str

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> KeyProvider: ...

    async def start(self) -> None:
        """Open clients and load key material; raise SidecryptError if that fails."""

    async def close(self) -> None: ...

    async def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        """A fresh 32-byte data key wrapped under the newest key version, bound to context."""

    async def decrypt_data_key(
        self, wrapped: bytes, key_version: int, context: Mapping[str, str]
    ) -> bytes:
        """Unwrap; raise CryptoError if the blob or context does not authenticate."""

    async def check_ready(self) -> None:
        """Raise KeyProviderError when the provider cannot serve new keys."""

    def describe(self) -> dict[str, Any]:
        """Non-secret facts for ``keys list`` and readiness: ids, versions, state."""


@dataclass(frozen=True, slots=True)
class CacheLimits:
    """Encrypt-side limits per cached data key, and the decrypt-side LRU size and TTL.

    ``max_uses`` stays far below 2**32, the NIST bound for random 96-bit GCM nonces.
    """

    max_age: float = 300.0
    max_uses: int = 1_000_000
    max_bytes: int = 1 << 34
    decrypt_entries: int = 10_000
    decrypt_ttl: float = 300.0
    decrypt_concurrency: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.max_uses <= 1 << 32:
            raise ValueError("max_uses must be between 1 and 2**32")


class CachedKey:
    """A data key ready to use: its AEAD object is built once and reused."""

    __slots__ = (
        "aead",
        "bytes",
        "expires",
        "header",
        "key_version",
        "provider",
        "uses",
        "wrapped",
    )

    def __init__(self, provider: KeyProvider, key: DataKey, expires: float) -> None:
        self.aead = AESGCM(key.plaintext)
        self.wrapped = key.wrapped
        self.key_version = key.key_version
        self.provider = provider
        self.expires = expires
        self.uses = 0
        self.bytes = 0
        # The token header for this key's (name, context): public bytes, set by the first field.
        self.header: bytes | None = None

    def __repr__(self) -> str:
        return (
            f"CachedKey(key={self.provider.name!r}, version={self.key_version}, uses={self.uses})"
        )


AuditFn = Callable[[AuditEvent], None]


def _no_audit(event: AuditEvent) -> None:
    return None


class DataKeyService:
    """Caching, single-flight front for all configured key providers."""

    def __init__(
        self,
        providers: Mapping[str, KeyProvider],
        limits: CacheLimits | None = None,
        *,
        audit: AuditFn = _no_audit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.providers = dict(providers)
        self.limits = limits or CacheLimits()
        self.audit = audit
        self._clock = clock
        self._enc: dict[tuple[str, Context], CachedKey] = {}
        self._dec: OrderedDict[bytes, tuple[AESGCM, float, float]] = OrderedDict()
        self._inflight: dict[object, asyncio.Future[Any]] = {}
        self.stats: dict[str, int] = {
            "encrypt_hits": 0,
            "encrypt_misses": 0,
            "decrypt_hits": 0,
            "decrypt_misses": 0,
            "evictions": 0,
            "provider_errors": 0,
            "stale_hits": 0,
        }

    def provider(self, name: str) -> KeyProvider:
        try:
            return self.providers[name]
        except KeyError:
            raise CryptoError(f"unknown key {name!r}", code="unknown_key") from None

    def provider_for(self, name: str, provider_type: str) -> KeyProvider:
        """The provider that unwraps a token of ``provider_type`` under key ``name``: the
        key's own, or for a key that gained a hierarchy since, the provider underneath it
        (``legacy``) for the tokens it wrapped directly."""
        provider = self.provider(name)
        if provider.type_name == provider_type:
            return provider
        legacy = getattr(provider, "legacy", None)
        if legacy is not None and legacy.type_name == provider_type:
            return legacy  # type: ignore[no-any-return]
        raise CryptoError(f"key {name!r} is not a {provider_type} key")

    # -- encrypt side -----------------------------------------------------------------------

    def cached_for_encrypt(self, name: str, context: Context, nbytes: int) -> CachedKey | None:
        """Hot path: a cached key with room for one more use, or None (no await needed)."""
        entry = self._enc.get((name, context))
        if entry is None:
            return None
        limits = self.limits
        if (
            entry.uses >= limits.max_uses
            or entry.bytes + nbytes > limits.max_bytes
            or self._clock() >= entry.expires
        ):
            if not self._stale_ok(entry, nbytes):
                del self._enc[(name, context)]
                self.stats["evictions"] += 1
            return None
        entry.uses += 1
        entry.bytes += nbytes
        self.stats["encrypt_hits"] += 1
        return entry

    def cached_for_encrypt_many(
        self, name: str, context: Context, nbytes: int, uses: int
    ) -> CachedKey | None:
        """A whole body's fields at once: a cached key with room for ``uses`` more uses and
        ``nbytes`` more bytes, counted, or None with nothing changed (then go field by field,
        which handles expiry, eviction and the stale grace exactly)."""
        entry = self._enc.get((name, context))
        if entry is None:
            return None
        limits = self.limits
        if (
            entry.uses + uses > limits.max_uses
            or entry.bytes + nbytes > limits.max_bytes
            or self._clock() >= entry.expires
        ):
            return None
        entry.uses += uses
        entry.bytes += nbytes
        self.stats["encrypt_hits"] += uses
        return entry

    async def for_encrypt(self, name: str, context: Context, nbytes: int = 0) -> CachedKey:
        """A data key for one field encryption, from the cache or one shared provider call."""
        entry = self.cached_for_encrypt(name, context, nbytes)
        if entry is not None:
            return entry
        provider = self.provider(name)
        flight = ("enc", name, context)

        async def generate() -> CachedKey:
            key = await self._call(
                provider, "generate_data_key", provider.generate_data_key(dict(context))
            )
            if (
                len(key.plaintext) != DATA_KEY_BYTES
                or not 0 < len(key.wrapped) <= MAX_WRAPPED_BYTES
            ):
                raise KeyProviderError(f"key {name!r}: provider returned a malformed data key")
            age = min(self.limits.max_age, float(getattr(provider, "decrypt_ttl", math.inf)))
            cached = CachedKey(provider, key, self._clock() + age)
            self._enc[(name, context)] = cached
            self.audit(
                AuditEvent(
                    "generate_data_key",
                    key=name,
                    provider=provider.type_name,
                    key_version=key.key_version,
                    context=dict(context),
                    cache="miss",
                )
            )
            return cached

        try:
            fresh: CachedKey = await self._single_flight(flight, generate)
        except KeyProviderError:
            stale = self._enc.get((name, context))
            if stale is None or not self._stale_ok(stale, nbytes):
                raise
            self.stats["stale_hits"] += 1
            stale.uses += 1
            stale.bytes += nbytes
            return stale
        self.stats["encrypt_misses"] += 1
        if fresh.uses == 0 and nbytes > self.limits.max_bytes:
            # Over the byte limit on its own (ESDK: bypass the cache): use once, never reuse.
            if self._enc.get((name, context)) is fresh:
                del self._enc[(name, context)]
        elif fresh.uses >= self.limits.max_uses or fresh.bytes + nbytes > self.limits.max_bytes:
            # Another waiter used the last slot; start over rather than exceed a limit.
            return await self.for_encrypt(name, context, nbytes)
        fresh.uses += 1
        fresh.bytes += nbytes
        return fresh

    # -- decrypt side -----------------------------------------------------------------------

    def _stale_ok(self, entry: CachedKey, nbytes: int) -> bool:
        """While its provider fails, an expired key may serve up to ``provider.outage_grace``
        seconds longer (KMS outage budget). Use and byte limits are never stretched."""
        grace = float(getattr(entry.provider, "outage_grace", 0.0))
        return (
            entry.uses < self.limits.max_uses
            and entry.bytes + nbytes <= self.limits.max_bytes
            and self._clock() < entry.expires + grace
        )

    def cached_for_decrypt(self, wrapped: bytes) -> AESGCM | None:
        hit = self._dec.get(wrapped)
        if hit is None:
            return None
        aead, expires, stale_until = hit
        if self._clock() >= expires:
            if self._clock() >= stale_until:  # else kept for for_decrypt's outage fallback
                del self._dec[wrapped]
                self.stats["evictions"] += 1
            return None
        self._dec.move_to_end(wrapped)
        self.stats["decrypt_hits"] += 1
        return aead

    async def for_decrypt_many(
        self, wanted: Mapping[bytes, tuple[str, str, int, Context]]
    ) -> dict[bytes, AESGCM | SidecryptError]:
        """Unwrap many distinct data keys at once: ``wrapped -> (name, provider type, version,
        context)``. Concurrent (at most ``decrypt_concurrency`` provider calls in flight),
        single-flight per wrapped key; a failure is returned for its key, not raised, so
        the caller applies its per-field error policy."""
        limit = asyncio.Semaphore(self.limits.decrypt_concurrency)

        async def one(wrapped: bytes, spec: tuple[str, str, int, Context]) -> AESGCM:
            cached = self.cached_for_decrypt(wrapped)
            if cached is not None:
                return cached
            async with limit:
                name, ptype, version, context = spec
                return await self.for_decrypt(name, wrapped, version, context, provider_type=ptype)

        items = list(wanted.items())
        results = await asyncio.gather(*(one(w, spec) for w, spec in items), return_exceptions=True)
        out: dict[bytes, AESGCM | SidecryptError] = {}
        for (wrapped, _), result in zip(items, results, strict=True):
            if isinstance(result, SidecryptError | AESGCM):
                out[wrapped] = result
            elif isinstance(result, BaseException):
                raise result
        return out

    async def for_decrypt(
        self,
        name: str,
        wrapped: bytes,
        key_version: int,
        context: Context,
        *,
        provider_type: str | None = None,
    ) -> AESGCM:
        """The AEAD for a wrapped data key, unwrapping it at most once at a time.

        The cache is keyed by the wrapped bytes only: a provider binds the context into the
        wrapped key, and the field AAD binds it again, so a cached key used under another
        context still fails to authenticate the field.
        """
        cached = self.cached_for_decrypt(wrapped)
        if cached is not None:
            return cached
        if provider_type is None:
            provider = self.provider(name)
        else:
            provider = self.provider_for(name, provider_type)
        if not 0 < len(wrapped) <= MAX_WRAPPED_BYTES:
            raise CryptoError("wrapped data key has an invalid length")

        async def unwrap() -> AESGCM:
            plaintext = await self._call(
                provider,
                "decrypt_data_key",
                provider.decrypt_data_key(wrapped, key_version, dict(context)),
            )
            if len(plaintext) != DATA_KEY_BYTES:
                raise KeyProviderError(f"key {name!r}: provider returned a malformed data key")
            aead = AESGCM(plaintext)
            ttl = min(self.limits.decrypt_ttl, float(getattr(provider, "decrypt_ttl", math.inf)))
            expires = self._clock() + ttl
            grace = float(getattr(provider, "outage_grace", 0.0))
            self._dec[wrapped] = (aead, expires, expires + grace)
            while len(self._dec) > self.limits.decrypt_entries:
                self._dec.popitem(last=False)
                self.stats["evictions"] += 1
            self.audit(
                AuditEvent(
                    "decrypt_data_key",
                    key=name,
                    provider=provider.type_name,
                    key_version=key_version,
                    context=dict(context),
                    cache="miss",
                )
            )
            return aead

        try:
            aead: AESGCM = await self._single_flight(("dec", wrapped), unwrap)
        except KeyProviderError:
            hit = self._dec.get(wrapped)  # expired but kept: serve it while the provider fails
            if hit is None or self._clock() >= hit[2]:
                raise
            self.stats["stale_hits"] += 1
            return hit[0]
        self.stats["decrypt_misses"] += 1
        return aead

    # -- plumbing ---------------------------------------------------------------------------

    async def _single_flight(self, flight: object, make: Callable[[], Awaitable[Any]]) -> Any:
        """Concurrent callers for the same flight share one result; failures are not kept."""
        pending = self._inflight.get(flight)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and task is not None and not task.cancelling():
                    # The leader was cancelled (client gone), not this caller: try again.
                    return await self._single_flight(flight, make)
                raise
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[flight] = future
        try:
            result = await make()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters may be none
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[flight]

    async def _call(self, provider: KeyProvider, op: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except SidecryptError as exc:
            self.stats["provider_errors"] += 1
            self._audit_failure(provider, op, exc)
            raise
        except Exception as exc:
            self.stats["provider_errors"] += 1
            self._audit_failure(provider, op, exc)
            raise KeyProviderError(
                f"key {provider.name!r}: {op} failed ({type(exc).__name__})"
            ) from exc

    def _audit_failure(self, provider: KeyProvider, op: str, exc: BaseException) -> None:
        self.audit(
            AuditEvent(
                op,
                outcome="error",
                key=provider.name,
                provider=provider.type_name,
                error=type(exc).__name__,
            )
        )

    def clear(self) -> None:
        """Forget every cached key (rotation on demand, shutdown)."""
        self._enc.clear()
        self._dec.clear()
