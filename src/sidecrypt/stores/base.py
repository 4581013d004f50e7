"""The store contract: a backend (``sqlite``, ``postgresql``, a third party's) and its tables.

A :class:`Store` is one configured ``stores.<name>`` block. It owns a connection (or pool), a
``schema_version`` table, and one *table object* per feature that it supports (see the package
docstring for the convention). All I/O is async; nothing here knows HTTP or key providers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from ..errors import SidecryptError


class StoreError(SidecryptError):
    """A store is unreachable, failing, or its schema is not current: fail closed with 503.

    Codes: ``store_unavailable`` (cannot reach or query), ``store_schema`` (schema missing or
    older than this sidecrypt: run ``sidecrypt store migrate``), ``store_conflict`` (a write
    lost to a constraint in a way the caller must handle), ``store_unsupported`` (this store
    type has no table for a feature). Messages name stores and tables, never row contents.
    """

    status = 503
    code = "store_unavailable"
    retry_after: int = 5

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code)


class StoreOptions(BaseModel):
    """Base for a store type's config block; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step of one feature on one backend: applied once, in version order.

    ``version`` counts per feature (1, 2, ...), so features evolve independently; the
    ``schema_version`` table records the highest version applied for each feature.
    """

    version: int
    statements: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True, slots=True)
class FeatureTable:
    """How one backend implements one feature's table protocol.

    ``factory`` receives the started backend (its connection owner) and returns the object
    that implements the feature's protocol (e.g. ``crypto.hierarchy.BranchKeyTable``).
    """

    feature: str
    migrations: Sequence[Migration]
    factory: Any  # Callable[[backend], table]: typed per backend

    @property
    def latest(self) -> int:
        return max((m.version for m in self.migrations), default=0)


@runtime_checkable
class Store(Protocol):
    """One configured store. Classes come from the ``sidecrypt_store_types`` hook; the config
    picks one by ``type_name`` and builds it with :meth:`create`."""

    type_name: ClassVar[str]
    options_model: ClassVar[type[StoreOptions]]
    name: str

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> Store: ...

    async def start(self) -> None:
        """Connect (and, where the store allows it, migrate); raise StoreError on failure."""

    async def close(self) -> None: ...

    async def check(self) -> None:
        """Readiness: raise StoreError (with a code) unless a query answers and the schema is
        current."""

    async def migrate(self) -> dict[str, tuple[int, int]]:
        """Create or migrate every feature's tables; ``{feature: (before, after)}``. Safe to
        run concurrently from several hosts (one applies, the others wait and see it done)."""

    def table(self, feature: str) -> Any:
        """The object implementing ``feature``'s table protocol, or StoreError
        ``store_unsupported``. Features wrap this in a typed accessor."""

    def describe(self) -> dict[str, Any]:
        """Non-secret facts (type, path or host, schema versions) for CLI and readiness."""


def unsupported(store: str, type_name: str, feature: str) -> StoreError:
    return StoreError(
        f"store {store!r} (type {type_name}) has no table for {feature}",
        code="store_unsupported",
    )


def pending(
    features: Mapping[str, FeatureTable], applied: Mapping[str, int]
) -> dict[str, list[Migration]]:
    """Migrations still to run per feature, in order (shared by the SQL backends)."""
    out: dict[str, list[Migration]] = {}
    for name, feature in features.items():
        todo = sorted(
            (m for m in feature.migrations if m.version > applied.get(name, 0)),
            key=lambda m: m.version,
        )
        if todo:
            out[name] = todo
    return out


def schema_problem(features: Mapping[str, FeatureTable], applied: Mapping[str, int]) -> str | None:
    """Why the schema is not current (names the features), or None."""
    behind = [
        f"{name} at {applied.get(name, 0)} (need {feature.latest})"
        for name, feature in sorted(features.items())
        if applied.get(name, 0) < feature.latest
    ]
    ahead = [
        f"{name} at {version} (this sidecrypt knows {features[name].latest})"
        for name, version in sorted(applied.items())
        if name in features and version > features[name].latest
    ]
    if behind:
        return "schema not current: " + ", ".join(behind) + "; run `sidecrypt store migrate`"
    if ahead:
        return "schema is newer than this sidecrypt: " + ", ".join(ahead)
    return None
