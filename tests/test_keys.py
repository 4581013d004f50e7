"""DataKeyService: cache limits, decrypt LRU + TTL, single flight, failures, sizes, reprs."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecrypt.errors import CryptoError, KeyProviderError
from sidecrypt.events import AuditEvent
from sidecrypt.keys import (
    CachedKey,
    CacheLimits,
    DataKey,
    DataKeyService,
    KeyProvider,
    ProviderOptions,
    canonical_context,
)

CTX = canonical_context({"tenant": "acme"})


class FakeProvider:
    """Wraps with real AES-GCM under a fixed KEK; counts calls; can be gated or made to fail."""

    type_name: ClassVar[str] = "fake"
    options_model: ClassVar[type[ProviderOptions]] = ProviderOptions

    def __init__(self, name: str = "app") -> None:
        self.name = name
        self.kek = AESGCM(os.urandom(32))
        self.calls: Counter[str] = Counter()
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None
        self.plaintext_size = 32
        self.wrapped_size: int | None = None

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> FakeProvider:
        return cls(name)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _enter(self, op: str) -> None:
        self.calls[op] += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail

    async def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        await self._enter("generate")
        plaintext = os.urandom(self.plaintext_size)
        nonce = os.urandom(12)
        wrapped = nonce + self.kek.encrypt(nonce, plaintext, repr(sorted(context.items())).encode())
        if self.wrapped_size is not None:
            wrapped = wrapped[: self.wrapped_size].ljust(self.wrapped_size, b"\0")
        return DataKey(plaintext, wrapped, 1)

    async def decrypt_data_key(
        self, wrapped: bytes, key_version: int, context: Mapping[str, str]
    ) -> bytes:
        await self._enter("decrypt")
        aad = repr(sorted(context.items())).encode()
        return self.kek.decrypt(wrapped[:12], wrapped[12:], aad)[: self.plaintext_size]

    async def check_ready(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def service(
    provider: FakeProvider,
    clock: Clock | None = None,
    events: list[AuditEvent] | None = None,
    **limits: Any,
) -> DataKeyService:
    audit = events.append if events is not None else (lambda e: None)
    return DataKeyService(
        {provider.name: provider}, CacheLimits(**limits), audit=audit, clock=clock or Clock()
    )


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_fake_is_a_key_provider() -> None:
    assert isinstance(FakeProvider(), KeyProvider)


# -- encrypt-side limits -------------------------------------------------------------------


async def test_max_uses_limits_one_data_key() -> None:
    provider = FakeProvider()
    svc = service(provider, max_uses=3)
    keys = [await svc.for_encrypt("app", CTX) for _ in range(7)]
    assert [k.uses for k in keys[:3]] == [3, 3, 3]
    assert len({id(k) for k in keys}) == 3  # 3 + 3 + 1
    assert provider.calls["generate"] == 3
    assert svc.stats["encrypt_hits"] == 4 and svc.stats["encrypt_misses"] == 3


async def test_many_uses_at_once_fit_or_change_nothing() -> None:
    """A body's fields counted in one lookup; a key without room for all is left as it was."""
    provider, clock = FakeProvider(), Clock()
    svc = service(provider, clock, max_uses=5, max_bytes=100, max_age=10.0)
    assert svc.cached_for_encrypt_many("app", CTX, 10, 3) is None  # nothing cached yet
    first = await svc.for_encrypt("app", CTX, 10)
    assert svc.cached_for_encrypt_many("app", CTX, 20, 3) is first
    assert (first.uses, first.bytes, svc.stats["encrypt_hits"]) == (4, 30, 3)
    assert svc.cached_for_encrypt_many("app", CTX, 1, 2) is None  # 4 + 2 > max_uses
    assert svc.cached_for_encrypt_many("app", CTX, 71, 1) is None  # 30 + 71 > max_bytes
    assert (first.uses, first.bytes, svc.stats["evictions"]) == (4, 30, 0)
    assert svc.cached_for_encrypt("app", CTX, 1) is first  # the last use is still there
    clock.now += 10.0
    assert svc.cached_for_encrypt_many("app", CTX, 1, 1) is None  # expired
    assert provider.calls["generate"] == 1


async def test_max_age_with_a_fake_clock() -> None:
    provider, clock = FakeProvider(), Clock()
    svc = service(provider, clock, max_age=10.0)
    first = await svc.for_encrypt("app", CTX)
    clock.now += 9.999
    assert await svc.for_encrypt("app", CTX) is first
    clock.now += 0.001
    second = await svc.for_encrypt("app", CTX)
    assert second is not first and second.wrapped != first.wrapped
    assert provider.calls["generate"] == 2


async def test_max_bytes_counts_plaintext_bytes() -> None:
    provider = FakeProvider()
    svc = service(provider, max_bytes=100)
    first = await svc.for_encrypt("app", CTX, 40)
    assert await svc.for_encrypt("app", CTX, 60) is first  # exactly 100
    second = await svc.for_encrypt("app", CTX, 1)
    assert second is not first and second.bytes == 1
    assert provider.calls["generate"] == 2


async def test_message_larger_than_max_bytes_gets_a_fresh_uncached_key() -> None:
    provider = FakeProvider()
    svc = service(provider, max_bytes=100)
    big = await svc.for_encrypt("app", CTX, 150)
    assert provider.calls["generate"] == 1  # not a retry loop
    small = await svc.for_encrypt("app", CTX, 10)
    assert small is not big  # the oversized key was used once and not kept
    assert provider.calls["generate"] == 2


async def test_keys_are_per_name_and_context() -> None:
    a, b = FakeProvider("a"), FakeProvider("b")
    svc = DataKeyService({"a": a, "b": b})
    ka = await svc.for_encrypt("a", CTX)
    assert await svc.for_encrypt("b", CTX) is not ka
    assert await svc.for_encrypt("a", canonical_context({"tenant": "other"})) is not ka
    assert await svc.for_encrypt("a", CTX) is ka
    with pytest.raises(CryptoError) as err:
        await svc.for_encrypt("nope", CTX)
    assert err.value.code == "unknown_key"


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        CacheLimits(max_uses=0)
    with pytest.raises(ValueError):
        CacheLimits(max_uses=(1 << 32) + 1)


# -- decrypt side --------------------------------------------------------------------------


async def test_decrypt_cache_is_a_bounded_lru() -> None:
    provider = FakeProvider()
    svc = service(provider, decrypt_entries=2)
    wrapped = [(await provider.generate_data_key(dict(CTX))).wrapped for _ in range(3)]
    w1, w2, w3 = wrapped
    await svc.for_decrypt("app", w1, 1, CTX)
    await svc.for_decrypt("app", w2, 1, CTX)
    await svc.for_decrypt("app", w1, 1, CTX)  # hit: w1 becomes most recent
    assert provider.calls["decrypt"] == 2
    await svc.for_decrypt("app", w3, 1, CTX)  # evicts w2, the least recent
    await svc.for_decrypt("app", w1, 1, CTX)
    assert provider.calls["decrypt"] == 3
    await svc.for_decrypt("app", w2, 1, CTX)
    assert provider.calls["decrypt"] == 4
    assert svc.stats["decrypt_hits"] == 2 and svc.stats["evictions"] == 2


async def test_decrypt_cache_ttl_with_a_fake_clock() -> None:
    provider, clock = FakeProvider(), Clock()
    svc = service(provider, clock, decrypt_ttl=5.0)
    wrapped = (await provider.generate_data_key(dict(CTX))).wrapped
    first = await svc.for_decrypt("app", wrapped, 1, CTX)
    clock.now += 4.9
    assert await svc.for_decrypt("app", wrapped, 1, CTX) is first
    clock.now += 0.1
    await svc.for_decrypt("app", wrapped, 1, CTX)
    assert provider.calls["decrypt"] == 2


async def test_decrypted_key_matches_the_encrypt_side() -> None:
    provider = FakeProvider()
    svc = service(provider)
    enc = await svc.for_encrypt("app", CTX)
    nonce = os.urandom(12)
    ct = enc.aead.encrypt(nonce, b"value", b"aad")
    dec = await svc.for_decrypt("app", enc.wrapped, enc.key_version, CTX)
    assert dec.decrypt(nonce, ct, b"aad") == b"value"
    assert provider.calls["decrypt"] == 1


# -- single flight -------------------------------------------------------------------------


async def test_concurrent_encrypt_callers_share_one_provider_call() -> None:
    provider = FakeProvider()
    provider.gate = asyncio.Event()
    svc = service(provider)
    tasks = [asyncio.create_task(svc.for_encrypt("app", CTX)) for _ in range(20)]
    await settle()
    assert provider.calls["generate"] == 1
    provider.gate.set()
    keys = await asyncio.gather(*tasks)
    assert len({id(k) for k in keys}) == 1 and keys[0].uses == 20
    assert provider.calls["generate"] == 1


async def test_concurrent_callers_never_exceed_max_uses() -> None:
    provider = FakeProvider()
    provider.gate = asyncio.Event()
    svc = service(provider, max_uses=3)
    tasks = [asyncio.create_task(svc.for_encrypt("app", CTX)) for _ in range(10)]
    await settle()
    provider.gate.set()
    keys = await asyncio.gather(*tasks)
    per_key = Counter(id(k) for k in keys)
    assert max(per_key.values()) <= 3 and sum(per_key.values()) == 10
    assert all(k.uses <= 3 for k in keys)
    assert provider.calls["generate"] == 4


async def test_concurrent_decrypt_callers_share_one_provider_call() -> None:
    provider = FakeProvider()
    wrapped = (await provider.generate_data_key(dict(CTX))).wrapped
    provider.gate = asyncio.Event()
    svc = service(provider)
    tasks = [asyncio.create_task(svc.for_decrypt("app", wrapped, 1, CTX)) for _ in range(20)]
    await settle()
    provider.gate.set()
    aeads = await asyncio.gather(*tasks)
    assert len({id(a) for a in aeads}) == 1
    assert provider.calls["decrypt"] == 1


async def test_waiters_survive_the_first_caller_being_cancelled() -> None:
    provider = FakeProvider()
    provider.gate = asyncio.Event()
    svc = service(provider)
    first = asyncio.create_task(svc.for_encrypt("app", CTX))
    await settle()
    waiters = [asyncio.create_task(svc.for_encrypt("app", CTX)) for _ in range(3)]
    await settle()
    first.cancel()
    await settle()
    provider.gate.set()
    keys = await asyncio.gather(*waiters)
    assert len({id(k) for k in keys}) == 1
    with pytest.raises(asyncio.CancelledError):
        await first


# -- failures ------------------------------------------------------------------------------


async def test_failures_are_shared_but_never_cached() -> None:
    provider = FakeProvider()
    provider.gate = asyncio.Event()
    provider.fail = KeyProviderError("kms unreachable")
    events: list[AuditEvent] = []
    svc = service(provider, events=events)
    tasks = [asyncio.create_task(svc.for_encrypt("app", CTX)) for _ in range(5)]
    await settle()
    provider.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, KeyProviderError) for r in results)
    assert provider.calls["generate"] == 1
    provider.fail = None
    key = await svc.for_encrypt("app", CTX)
    assert provider.calls["generate"] == 2 and key.uses == 1
    assert [(e.action, e.outcome) for e in events] == [
        ("generate_data_key", "error"),
        ("generate_data_key", "ok"),
    ]
    assert svc.stats["provider_errors"] == 1


async def test_decrypt_failure_is_not_cached() -> None:
    provider = FakeProvider()
    wrapped = (await provider.generate_data_key(dict(CTX))).wrapped
    svc = service(provider)
    provider.fail = ConnectionError("reset")
    with pytest.raises(KeyProviderError):
        await svc.for_decrypt("app", wrapped, 1, CTX)
    provider.fail = None
    await svc.for_decrypt("app", wrapped, 1, CTX)
    assert provider.calls["decrypt"] == 2


async def test_foreign_errors_become_key_provider_errors_without_details() -> None:
    provider = FakeProvider()
    provider.fail = RuntimeError("secret-detail-1234")
    events: list[AuditEvent] = []
    svc = service(provider, events=events)
    with pytest.raises(KeyProviderError) as err:
        await svc.for_encrypt("app", CTX)
    assert "secret-detail" not in str(err.value)
    assert "'app'" in str(err.value) and "RuntimeError" in str(err.value)
    assert err.value.status == 503 and err.value.code == "key_provider_unavailable"
    assert isinstance(err.value.__cause__, RuntimeError)
    assert events[0].error == "RuntimeError" and "secret" not in repr(events[0])


async def test_crypto_errors_pass_through_unchanged() -> None:
    provider = FakeProvider()
    wrapped = (await provider.generate_data_key(dict(CTX))).wrapped
    svc = service(provider)
    with pytest.raises(KeyProviderError):  # InvalidTag from the fake is a foreign error
        await svc.for_decrypt("app", wrapped, 1, canonical_context({"tenant": "x"}))
    provider.fail = CryptoError("tampered")
    with pytest.raises(CryptoError, match="tampered"):
        await svc.for_decrypt("app", wrapped, 1, CTX)


# -- size checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plaintext_size", "wrapped_size"), [(16, None), (33, None), (32, 0), (32, 4097)]
)
async def test_malformed_generated_keys_are_refused(
    plaintext_size: int, wrapped_size: int | None
) -> None:
    provider = FakeProvider()
    provider.plaintext_size, provider.wrapped_size = plaintext_size, wrapped_size
    svc = service(provider)
    with pytest.raises(KeyProviderError, match="malformed"):
        await svc.for_encrypt("app", CTX)
    provider.plaintext_size, provider.wrapped_size = 32, None
    assert (await svc.for_encrypt("app", CTX)).uses == 1  # nothing bad was cached
    assert provider.calls["generate"] == 2


async def test_wrapped_size_is_checked_before_the_provider() -> None:
    provider = FakeProvider()
    svc = service(provider)
    for wrapped in (b"", b"x" * 4097):
        with pytest.raises(CryptoError, match="invalid length"):
            await svc.for_decrypt("app", wrapped, 1, CTX)
    assert provider.calls["decrypt"] == 0


async def test_short_unwrapped_key_is_refused() -> None:
    provider = FakeProvider()
    wrapped = (await provider.generate_data_key(dict(CTX))).wrapped
    provider.plaintext_size = 31
    svc = service(provider)
    with pytest.raises(KeyProviderError, match="malformed"):
        await svc.for_decrypt("app", wrapped, 1, CTX)
    assert svc.cached_for_decrypt(wrapped) is None


# -- no key bytes in reprs -----------------------------------------------------------------


async def test_reprs_hide_key_bytes() -> None:
    provider = FakeProvider()
    key = await provider.generate_data_key(dict(CTX))
    events: list[AuditEvent] = []
    svc = service(provider, events=events)
    cached = await svc.for_encrypt("app", CTX)
    texts = [repr(key), str(key), repr(cached), repr(svc._enc), repr(svc.stats)]
    texts += [repr(e) for e in events] + [str(e.to_dict()) for e in events]
    assert isinstance(cached, CachedKey)
    for text in texts:
        for secret in (key.plaintext, key.wrapped):
            assert secret.hex() not in text and repr(secret) not in text
    assert "wrapped=<" in repr(key)
