"""The token vault's tables: the one thing the vault needs from a store.

Each store backend implements :class:`VaultTable` in ``stores/<backend>/vault.py``. Rows hold
only ciphertext and keyed digests: ``sealed`` is the value as an ``sc1.`` envelope (AES-256-GCM
under the route's key, AAD binding token, format and context), ``bidx`` the keyed blind index
(HMAC-SHA-256 under a key derived from a wrapped root), and roots only wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

FEATURE = "token_vault"


@dataclass(frozen=True, slots=True)
class VaultRoot:
    """The root of a key's blind index and token stream, wrapped by the key's provider."""

    key: str
    version: int
    wrapped: bytes
    kek_version: int
    created_at: float

    def __repr__(self) -> str:
        return f"VaultRoot(key={self.key!r}, version={self.version}, wrapped=<{len(self.wrapped)}>)"


@dataclass(frozen=True, slots=True)
class VaultEntry:
    """One token. Unique on (key, context, token, format) (that order: detokenize looks up
    tokens of one key and context) and on bidx (consistent tokens)."""

    key: str
    format: str
    context: str  # canonical JSON of the encryption context (public, as in every sc1 token)
    token: str
    bidx: bytes | None  # None for a random token
    sealed: str
    kek_version: int
    created_at: float

    def __repr__(self) -> str:
        return f"VaultEntry(key={self.key!r}, format={self.format!r}, kek={self.kek_version})"


@runtime_checkable
class VaultTable(Protocol):
    """Vault rows on a store. Writes never read-then-write: unique constraints decide."""

    async def root(self, key: str) -> VaultRoot | None: ...

    async def insert_root(self, root: VaultRoot) -> VaultRoot:
        """Insert unless (key, version) exists; return the stored (maybe another's) root."""

    async def update_root(self, root: VaultRoot, old_wrapped: bytes) -> bool:
        """Re-wrapped root: replace ``wrapped``/``kek_version`` if it still is ``old_wrapped``."""

    async def by_index(self, bidxs: Sequence[bytes]) -> dict[bytes, str]:
        """bidx -> token for those present; one round trip per ``batch`` of indexes."""

    async def insert(self, entry: VaultEntry) -> str | None:
        """Insert the entry unless a unique constraint holds another. Consistent entries:
        the token now stored for ``entry.bidx`` (ours, or the winner's of a race), or None
        when ``entry.token`` is another value's (then try the next candidate). Random
        entries: ``entry.token`` when inserted, None on a token collision."""

    async def by_tokens(
        self, key: str, context: str, tokens: Sequence[str]
    ) -> list[tuple[str, str, str]]:
        """(format, token, sealed) for the tokens present: one round trip per batch."""

    async def entries(
        self, key: str, after: tuple[str, str, str] | None, limit: int
    ) -> list[VaultEntry]:
        """Rows of ``key`` in (context, token, format) order after ``after`` (rewrap paging:
        pass :func:`cursor` of the last row)."""

    async def update_sealed(self, entry: VaultEntry, old_sealed: str) -> bool:
        """Replace ``sealed``/``kek_version`` if the row still holds ``old_sealed``."""

    async def forget(self, context: str) -> int:
        """Delete every entry of one context; returns rows deleted."""

    async def stats(self) -> list[tuple[str, int, int]]:
        """(key, kek_version, entries) for every key and key version in use."""


def cursor(entry: VaultEntry) -> tuple[str, str, str]:
    """Paging cursor: the row's sort key."""
    return (entry.context, entry.token, entry.format)


def vault_table(store: object) -> VaultTable:
    """The store's vault table (StoreError ``store_unsupported`` if it has none)."""
    table = store.table(FEATURE)  # type: ignore[attr-defined]
    if not isinstance(table, VaultTable):
        raise TypeError(f"store returned a {type(table).__name__} for {FEATURE}")
    return table
