"""The vault on both backends (sqlite, a real PostgreSQL): round trips with types kept,
consistent tokens shared by two vaults on one store (also when racing), random tokens, batched
detokenize (one store call for 1,000 tokens), rows that were altered or moved fail closed,
forget, and no plaintext or unkeyed digest in the store."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from sidecrypt.errors import CryptoError
from sidecrypt.events import AuditEvent
from sidecrypt.tokens.cache import MISSING
from sidecrypt.tokens.formats import build_format
from sidecrypt.tokens.table import cursor
from sidecrypt.tokens.vault import Vault

CTX = (("tenant", "acme"),)
SSN = build_format("ssn", {}, consistent=True)
DIGITS = build_format("digits", {}, consistent=True)
EMAIL = build_format("email", {}, consistent=True)
CARD = build_format("card", {}, consistent=False)
CANARY_SSN = "987-65-4321"
CANARY_EMAIL = "canary.person@example.org"


async def _rows(vault: Vault) -> list[Any]:
    out: list[Any] = []
    after = None
    while page := await vault.table.entries("app", after, 100):
        out.extend(page)
        after = cursor(page[-1])
    return out


async def test_round_trip_keeps_types_and_consistency(make_vault: Any) -> None:
    vault = await make_vault()
    items = [(SSN, True, CANARY_SSN), (DIGITS, True, 4412345678), (EMAIL, True, CANARY_EMAIL)]
    tokens = await vault.tokenize("app", CTX, items)
    assert isinstance(tokens[1], int) and len(str(tokens[1])) == 10
    assert tokens[0] != CANARY_SSN and len(tokens[0]) == 11
    assert tokens == await vault.tokenize("app", CTX, items)
    other = await make_vault(cache_entries=0)  # a second sidecar on the same store
    assert tokens == await other.tokenize("app", CTX, items)
    values = await other.detokenize(
        "app", CTX, [(f, t) for (f, _, _), t in zip(items, tokens, strict=True)]
    )
    assert values == [CANARY_SSN, 4412345678, CANARY_EMAIL]
    assert type(values[1]) is int
    # Another context: other tokens, and this context's tokens do not resolve there.
    elsewhere = await vault.tokenize("app", (("tenant", "other"),), items[:1])
    assert elsewhere != tokens[:1]
    assert await other.detokenize("app", (("tenant", "other"),), [(SSN, tokens[0])]) == [MISSING]


async def test_random_tokens_differ_per_write(make_vault: Any) -> None:
    vault = await make_vault()
    card = "4111 1111 1111 1111"
    a, b = await vault.tokenize("app", CTX, [(CARD, False, card), (CARD, False, card)])
    assert a != b and a[:7] == card[:7] and a[-4:] == card[-4:]
    other = await make_vault(cache_entries=0)
    assert await other.detokenize("app", CTX, [(CARD, a), (CARD, b)]) == [card, card]


async def test_racing_first_writes_end_with_one_token(make_vault: Any) -> None:
    vaults = [await make_vault(cache_entries=0) for _ in range(4)]
    values = [f"{i:03d}-55-{i:04d}" for i in range(100, 140)]
    results = await asyncio.gather(
        *(v.tokenize("app", CTX, [(SSN, True, x) for x in values]) for v in vaults)
    )
    assert all(r == results[0] for r in results)
    rows = await _rows(vaults[0])
    assert len(rows) == len(values)


async def test_one_store_call_for_a_thousand_tokens(make_vault: Any) -> None:
    writer = await make_vault()
    values = [f"{i:09d}" for i in range(100_000_000, 100_001_000)]
    tokens = await writer.tokenize("app", CTX, [(SSN, True, v) for v in values])
    reader = await make_vault(cache_entries=10_000)
    await reader.token_keys("app")
    before = reader.stats["store_calls"]
    got = await reader.detokenize("app", CTX, [(SSN, t) for t in tokens])
    assert got == values
    assert reader.stats["store_calls"] - before == 1
    again = reader.stats["store_calls"]
    assert await reader.detokenize("app", CTX, [(SSN, t) for t in tokens]) == values
    assert reader.stats["store_calls"] == again  # warm: the cache answers
    assert reader.cache.hits >= 1000


async def test_store_holds_no_plaintext_and_no_unkeyed_digest(make_vault: Any) -> None:
    vault = await make_vault()
    await vault.tokenize("app", CTX, [(SSN, True, CANARY_SSN), (EMAIL, True, CANARY_EMAIL)])
    digests = {
        h(v.encode()).digest() for v in (CANARY_SSN, CANARY_EMAIL) for h in (hashlib.sha256,)
    } | {hashlib.sha256(f"str:{v}".encode()).digest() for v in (CANARY_SSN, CANARY_EMAIL)}
    for row in await _rows(vault):
        blob = repr(row.__getattribute__("sealed")) + row.token + row.context + row.format
        assert CANARY_SSN not in blob and "canary" not in blob
        assert row.bidx not in digests and row.sealed.startswith("sc1.")
    assert "canary" not in repr(vault) + repr(vault.cache)


@pytest.mark.parametrize("damage", ["altered", "moved_token", "moved_context"])
async def test_a_damaged_row_fails_closed(make_vault: Any, damage: str) -> None:
    vault = await make_vault()
    t1, t2 = await vault.tokenize(
        "app", CTX, [(SSN, True, "111-22-3333"), (SSN, True, "444-55-6666")]
    )
    rows = {r.token: r for r in await _rows(vault)}
    r1, r2 = rows[t1], rows[t2]
    if damage == "altered":
        s = r1.sealed
        mid = len(s) // 2 + 10
        new = s[:mid] + ("A" if s[mid] != "A" else "B") + s[mid + 1 :]
        target = r1
    elif damage == "moved_token":
        new, target = r2.sealed, r1  # t2's sealed value copied onto t1's row
    else:
        other = await vault.tokenize("app", (("tenant", "evil"),), [(SSN, True, "777-88-9999")])
        evil = next(r for r in await _rows(vault) if r.token == other[0])
        new, target = evil.sealed, r1
    from dataclasses import replace

    assert await vault.table.update_sealed(replace(target, sealed=new), target.sealed)
    fresh = await make_vault(cache_entries=0)
    with pytest.raises(CryptoError):
        await fresh.detokenize("app", CTX, [(SSN, target.token)])


async def test_forget_a_context(make_vault: Any) -> None:
    vault = await make_vault(cache_entries=0)
    (a,) = await vault.tokenize("app", CTX, [(SSN, True, CANARY_SSN)])
    (b,) = await vault.tokenize("app", (("tenant", "beta"),), [(SSN, True, CANARY_SSN)])
    from sidecrypt.tokens.vault import context_text

    assert await vault.table.forget(context_text(CTX)) == 1
    assert await vault.detokenize("app", CTX, [(SSN, a)]) == [MISSING]
    assert await vault.detokenize("app", (("tenant", "beta"),), [(SSN, b)]) == [CANARY_SSN]
    assert await vault.table.stats() == [("app", 1, 1)]


async def test_root_key_use_is_audited(make_vault: Any) -> None:
    events: list[AuditEvent] = []
    vault = await make_vault(audit=events)
    await vault.tokenize("app", CTX, [(SSN, True, CANARY_SSN)])
    second = await make_vault(audit=events)
    await second.token_keys("app")
    ops = [(e.action, e.context) for e in events]
    assert ("generate_data_key", {"sidecrypt": "token-root"}) in ops
    assert ("decrypt_data_key", {"sidecrypt": "token-root"}) in ops
    assert all("987" not in repr(e) for e in events)
