"""The branch key table: the one thing the key hierarchy needs from a store.

Each store backend implements :class:`BranchKeyTable` in its own module
(``stores/sqlite/branch_keys.py``, ``stores/postgresql/branch_keys.py``). Rows hold only the
branch key *wrapped* by the key's provider (KMS or the local keyring), never its plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

FEATURE = "branch_keys"


@dataclass(frozen=True, slots=True)
class BranchKeyRow:
    """One version of one branch key, as stored.

    ``key`` is the configured key name (``keys.<name>``); ``branch`` is ``""`` for the key's
    single branch or the canonical context part (``tenant=acme``) of a per-tenant branch;
    ``branch_id`` is a random id shared by every version of one lineage and named by tokens
    (so a branch forgotten and created again never decrypts the old tokens); ``wrapped`` is
    the branch key wrapped by the provider under ``kek_version``.
    """

    key: str
    branch: str
    version: int
    branch_id: str
    wrapped: bytes
    kek_version: int
    created_at: float

    def __repr__(self) -> str:
        return (
            f"BranchKeyRow(key={self.key!r}, branch={self.branch!r}, version={self.version}, "
            f"branch_id={self.branch_id!r}, wrapped=<{len(self.wrapped)} bytes>)"
        )


@runtime_checkable
class BranchKeyTable(Protocol):
    """Branch key versions on a store. Unique on (key, branch, version) and on
    (branch_id, version); writes never read-then-write."""

    async def insert(self, row: BranchKeyRow) -> BranchKeyRow:
        """Insert unless (key, branch, version) exists; return the stored row, which is the
        other writer's when it won the race (callers then use that one)."""

    async def latest(self, key: str, branch: str) -> BranchKeyRow | None:
        """The highest version of (key, branch), or None."""

    async def get(self, branch_id: str, version: int) -> BranchKeyRow | None:
        """The version a token names, or None (unknown or forgotten)."""

    async def versions(self, key: str) -> list[BranchKeyRow]:
        """Every stored version of every branch of ``key`` (for listing and stats)."""

    async def forget(self, key: str, branch: str) -> int:
        """Delete every version of (key, branch): crypto-shredding. Returns rows deleted."""
