"""The features this backend has tables for: one module each, listed here (add yours)."""

from __future__ import annotations

from ..base import FeatureTable
from . import branch_keys, vault

FEATURES: dict[str, FeatureTable] = {t.feature: t for t in (branch_keys.TABLE, vault.TABLE)}
