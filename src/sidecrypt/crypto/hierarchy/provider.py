"""Branch keys: a key provider (KMS or local) wraps *branch keys*, branch keys wrap data keys.

A key with ``hierarchy:`` is served by :class:`HierarchicalProvider` around its configured
provider. Each branch (the key itself, or one per value of ``per``, e.g. per tenant) has
versions 1, 2, ... stored in a shared store, each row holding only the branch key wrapped by the
provider (``generate_data_key`` under a context naming key, branch, branch id and version).
Data keys are random, wrapped locally with AES-256-GCM under the branch key version, so the
provider is called once per branch key version per ``cache_ttl`` per process, whatever the
number of data keys. The wrapped data key (docs/format.md, "Branch-wrapped data keys")::

    0x01 || branch_id (16) || nonce (12) || AES-256-GCM(data key) (32 + 16)

with AAD = ``hybrid.wrap_aad("A256GCM-BK", "<key>/<branch_id hex>:<version>", context)``; the
token header's provider type is the provider's plus ``.bk`` and its key version is the branch
key version. Tokens made before the key had a hierarchy keep their provider type and go to the
provider directly (:attr:`HierarchicalProvider.legacy`).

Races between sidecars are settled by the store: the first version and each rotation are an
insert that loses to an existing row, whose winner everyone then uses. The active version is
re-read every ``refresh`` seconds, so a rotation (scheduled by ``rotate_every`` or run with
``sidecrypt keys rotate --config``) reaches every sidecar within that bound, and a cached
branch key is re-checked against the store as often, so a forgotten branch stops decrypting
there too. While the store or the provider fails, cached versions keep serving up to the
provider's ``outage_grace``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ...errors import CryptoError, KeyProviderError, RequestError, SidecryptError
from ...hybrid import wrap_aad
from ...keys import DATA_KEY_BYTES, MAX_WRAPPED_BYTES, DataKey, KeyProvider, ProviderOptions
from .options import HierarchyOptions
from .table import BranchKeyRow, BranchKeyTable

LAYOUT = 1
BRANCH_ID_BYTES = 16
NONCE_BYTES = 12
WRAPPED_BYTES = 1 + BRANCH_ID_BYTES + NONCE_BYTES + DATA_KEY_BYTES + 16
SUFFIX = ".bk"
MAX_CACHED = 10_000  # branch key versions (and active branches) kept per key; oldest go first
ALG = "A256GCM-BK"


def branch_context(row: BranchKeyRow | tuple[str, str, str, int]) -> dict[str, str]:
    """The context the provider binds a branch key to (sent to KMS as EncryptionContext)."""
    key, branch, branch_id, version = (
        (row.key, row.branch, row.branch_id, row.version) if isinstance(row, BranchKeyRow) else row
    )
    return {
        "sidecrypt:purpose": "branch-key",
        "sidecrypt:key": key,
        "sidecrypt:branch": branch or "*",
        "sidecrypt:branch-id": branch_id,
        "sidecrypt:version": str(version),
    }


def seal_data_key(
    branch_key: AESGCM,
    key: str,
    branch_id: str,
    version: int,
    context: Mapping[str, str],
    data_key: bytes,
    nonce: bytes | None = None,
) -> bytes:
    """The branch-wrapped form of a data key (``nonce`` only for test vectors)."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    aad = wrap_aad(ALG, f"{key}/{branch_id}:{version}", context)
    return (
        bytes((LAYOUT,))
        + bytes.fromhex(branch_id)
        + nonce
        + branch_key.encrypt(nonce, data_key, aad)
    )


def open_data_key(
    branch_key: AESGCM, key: str, version: int, context: Mapping[str, str], wrapped: bytes
) -> bytes:
    """Unwrap a branch-wrapped data key; CryptoError unless it authenticates."""
    if len(wrapped) != WRAPPED_BYTES or wrapped[0] != LAYOUT:
        raise CryptoError(f"key {key!r}: not a branch-wrapped data key")
    branch_id = wrapped[1 : 1 + BRANCH_ID_BYTES].hex()
    start = 1 + BRANCH_ID_BYTES
    aad = wrap_aad(ALG, f"{key}/{branch_id}:{version}", context)
    try:
        return branch_key.decrypt(
            wrapped[start : start + NONCE_BYTES], wrapped[start + NONCE_BYTES :], aad
        )
    except InvalidTag:
        raise CryptoError(
            f"key {key!r}: wrapped data key does not authenticate "
            "(tampered, or another key, branch or context)"
        ) from None


def _outage(exc: SidecryptError) -> bool:
    """A store or provider failure (503), not a refusal of this token or request."""
    return not isinstance(exc, CryptoError | RequestError)


class _Unwrapped:
    """One branch key version in memory; never in a repr."""

    __slots__ = ("aead", "expires", "row", "validated")

    def __init__(self, aead: AESGCM, row: BranchKeyRow, expires: float, validated: float) -> None:
        self.aead = aead
        self.row = row
        self.expires = expires
        self.validated = validated

    def __repr__(self) -> str:
        return f"_Unwrapped({self.row!r})"


class HierarchicalProvider:
    """A key provider in front of another: same name, type ``<inner>.bk``."""

    options_model: ClassVar[type[ProviderOptions]] = ProviderOptions

    def __init__(
        self,
        inner: KeyProvider,
        options: HierarchyOptions,
        table: Callable[[], BranchKeyTable],
        *,
        lifecycle: tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]
        | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.name = inner.name
        self.legacy = inner
        self.type_name = inner.type_name + SUFFIX  # per instance: kms.bk, local.bk
        self.options = options
        self._table_of = table
        self._lifecycle = lifecycle  # (start, close) of a store this provider owns (CLI use)
        self._clock = clock
        self._wall = wall
        self._active: dict[str, tuple[BranchKeyRow, float]] = {}
        self._keys: dict[tuple[str, int], _Unwrapped] = {}
        self._inflight: dict[object, asyncio.Future[Any]] = {}
        self.branch_stats: Counter[str] = Counter()
        # The data key cache keeps unwrapped data keys no longer than this (forget bound).
        self.decrypt_ttl = options.refresh

    def __repr__(self) -> str:
        return f"HierarchicalProvider({self.legacy!r}, store={self.options.store!r})"

    @classmethod
    def create(cls, name: str, options: Any, *, base_dir: Path) -> KeyProvider:
        raise TypeError("built by plugin_manager.build_providers around a provider")

    # facts the data key service and metrics read from the provider they hold
    @property
    def outage_grace(self) -> float:
        return float(getattr(self.legacy, "outage_grace", 0.0))

    @property
    def stats(self) -> Any:
        return getattr(self.legacy, "stats", None)

    @property
    def breaker(self) -> Any:
        return getattr(self.legacy, "breaker", None)

    @property
    def outage_since(self) -> Any:
        return getattr(self.legacy, "outage_since", None)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._lifecycle is not None:
            await self._lifecycle[0]()
        await self.legacy.start()

    async def close(self) -> None:
        self._active.clear()
        self._keys.clear()
        try:
            await self.legacy.close()
        finally:
            if self._lifecycle is not None:
                await self._lifecycle[1]()

    async def check_ready(self) -> None:
        await self.legacy.check_ready()

    def describe(self) -> dict[str, Any]:
        out = dict(self.legacy.describe())
        out["hierarchy"] = {
            "store": self.options.store,
            "per": self.options.per,
            "rotate_every": self.options.rotate_every,
            "active": {b or "*": row.version for b, (row, _) in sorted(self._active.items())},
        }
        return out

    def __getattr__(self, name: str) -> Any:
        # public_key / public_jwks / rotate of the inner provider stay reachable
        if name in ("public_key", "public_jwks", "outage_seconds"):
            return getattr(self.legacy, name)
        raise AttributeError(name)

    # -- branches ---------------------------------------------------------------------------

    def branch_of(self, context: Mapping[str, str]) -> str:
        per = self.options.per
        if per is None:
            return ""
        value = context.get(per)
        if not value:
            raise RequestError(
                f"key {self.name!r} has a branch key per {per!r}, and the encryption context "
                f"has no {per!r}",
                code="context_missing",
            )
        return f"{per}={value}"

    @property
    def table(self) -> BranchKeyTable:
        return self._table_of()

    def _due(self, row: BranchKeyRow) -> bool:
        every = self.options.rotate_every
        return every is not None and self._wall() >= row.created_at + every

    async def active(self, branch: str) -> BranchKeyRow:
        """The version new data keys use (created or rotated here when needed)."""
        now = self._clock()
        hit = self._active.get(branch)
        if hit is not None and now < hit[1] and not self._due(hit[0]):
            return hit[0]
        try:
            row: BranchKeyRow = await self._single(("active", branch), lambda: self._load(branch))
        except SidecryptError as exc:
            # The store or provider fails: keep writing under the version we hold while its
            # key is cached (and the provider's outage budget after that).
            if _outage(exc) and hit is not None:
                cached = self._keys.get((hit[0].branch_id, hit[0].version))
                if cached is not None and now < cached.expires + self.outage_grace:
                    self.branch_stats["stale_active"] += 1
                    return hit[0]
            raise
        return row

    async def _load(self, branch: str) -> BranchKeyRow:
        row = await self.table.latest(self.name, branch)
        if row is None:
            row = await self._create(branch, 1, None)
        elif self._due(row):
            row = await self._create(branch, row.version + 1, row.branch_id)
        self._remember(self._active, branch, (row, self._clock() + self.options.refresh))
        return row

    @staticmethod
    def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
        """Insert, dropping the oldest entries beyond MAX_CACHED (many tenants)."""
        cache.pop(key, None)
        cache[key] = value
        while len(cache) > MAX_CACHED:
            del cache[next(iter(cache))]

    async def rotate(self, branch: str = "") -> BranchKeyRow:
        """A new active version now (on demand); other sidecars see it within ``refresh``."""
        latest = await self.table.latest(self.name, branch)
        if latest is None:
            row = await self._create(branch, 1, None)
        else:
            row = await self._create(branch, latest.version + 1, latest.branch_id)
        self._remember(self._active, branch, (row, self._clock() + self.options.refresh))
        return row

    async def _create(self, branch: str, version: int, branch_id: str | None) -> BranchKeyRow:
        bid = branch_id or os.urandom(BRANCH_ID_BYTES).hex()
        made = await self.legacy.generate_data_key(
            branch_context((self.name, branch, bid, version))
        )
        if len(made.plaintext) != DATA_KEY_BYTES or not 0 < len(made.wrapped) <= MAX_WRAPPED_BYTES:
            raise KeyProviderError(f"key {self.name!r}: provider returned a malformed branch key")
        row = BranchKeyRow(
            self.name, branch, version, bid, made.wrapped, made.key_version, self._wall()
        )
        stored = await self.table.insert(row)
        if stored == row:  # ours won: no need to unwrap what we just made
            now = self._clock()
            fresh = _Unwrapped(
                AESGCM(made.plaintext),
                stored,
                now + self.options.cache_ttl,
                now + self.options.refresh,
            )
            self._remember(self._keys, (bid, version), fresh)
            self.branch_stats["created"] += 1
        return stored

    async def _unwrapped(self, branch_id: str, version: int) -> _Unwrapped:
        now = self._clock()
        hit = self._keys.get((branch_id, version))
        if hit is not None and now < hit.expires and now < hit.validated:
            self.branch_stats["hits"] += 1
            return hit
        try:
            entry: _Unwrapped = await self._single(
                ("key", branch_id, version), lambda: self._fetch(branch_id, version, hit)
            )
        except SidecryptError as exc:
            if _outage(exc) and hit is not None and now < hit.expires + self.outage_grace:
                self.branch_stats["stale_hits"] += 1
                return hit
            raise
        return entry

    async def _fetch(self, branch_id: str, version: int, hit: _Unwrapped | None) -> _Unwrapped:
        now = self._clock()
        try:
            row = await self.table.get(branch_id, version)
        except SidecryptError:
            if hit is not None and now < hit.expires:
                return hit  # the store is down: a cached version keeps serving
            raise
        if row is None or row.key != self.name:
            self._keys.pop((branch_id, version), None)
            self.branch_stats["unknown"] += 1
            raise CryptoError(
                f"key {self.name!r}: branch key version {version} is unknown or was forgotten",
                code="branch_key_unknown",
            )
        if hit is not None and now < hit.expires and row.wrapped == hit.row.wrapped:
            hit.validated = now + self.options.refresh
            self.branch_stats["revalidated"] += 1
            return hit
        self.branch_stats["misses"] += 1
        plaintext = await self.legacy.decrypt_data_key(
            row.wrapped, row.kek_version, branch_context(row)
        )
        if len(plaintext) != DATA_KEY_BYTES:
            raise KeyProviderError(f"key {self.name!r}: provider returned a malformed branch key")
        entry = _Unwrapped(
            AESGCM(plaintext), row, now + self.options.cache_ttl, now + self.options.refresh
        )
        self._remember(self._keys, (branch_id, version), entry)
        return entry

    # -- KeyProvider ------------------------------------------------------------------------

    async def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        row = await self.active(self.branch_of(context))
        entry = await self._unwrapped(row.branch_id, row.version)
        plaintext = os.urandom(DATA_KEY_BYTES)
        wrapped = seal_data_key(
            entry.aead, self.name, row.branch_id, row.version, context, plaintext
        )
        return DataKey(plaintext, wrapped, row.version)

    async def decrypt_data_key(
        self, wrapped: bytes, key_version: int, context: Mapping[str, str]
    ) -> bytes:
        if len(wrapped) != WRAPPED_BYTES or wrapped[0] != LAYOUT:
            raise CryptoError(f"key {self.name!r}: not a branch-wrapped data key")
        branch = self.branch_of(context)
        entry = await self._unwrapped(wrapped[1 : 1 + BRANCH_ID_BYTES].hex(), key_version)
        if entry.row.branch != branch:
            raise CryptoError(
                f"key {self.name!r}: data key belongs to another branch", code="context_mismatch"
            )
        return open_data_key(entry.aead, self.name, key_version, context, wrapped)

    # -- plumbing ---------------------------------------------------------------------------

    async def _single(self, flight: object, make: Callable[[], Awaitable[Any]]) -> Any:
        """One call per flight at a time; failures are not kept (see DataKeyService)."""
        pending = self._inflight.get(flight)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and task is not None and not task.cancelling():
                    return await self._single(flight, make)  # the leader went, not us
                raise
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[flight] = future
        try:
            result = await make()
        except BaseException as exc:
            if not future.done():
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
                    future.exception()
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[flight]
