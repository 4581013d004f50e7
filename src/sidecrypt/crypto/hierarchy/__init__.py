"""The key hierarchy: branch keys kept wrapped in a store, data keys derived from them."""

from __future__ import annotations

from typing import Any

from .table import FEATURE, BranchKeyRow, BranchKeyTable

__all__ = ["FEATURE", "BranchKeyRow", "BranchKeyTable", "branch_keys"]


def branch_keys(store: Any) -> BranchKeyTable:
    """The store's branch key table (StoreError ``store_unsupported`` if it has none)."""
    table = store.table(FEATURE)
    if not isinstance(table, BranchKeyTable):
        raise TypeError(f"store {store.name!r} returned a {type(table).__name__} for {FEATURE}")
    return table
