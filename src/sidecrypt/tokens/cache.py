"""A bounded, TTL'd LRU for hot tokens. Values are plaintext: never shown in a repr."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

MISSING: Any = object()


class TokenCache:
    """``get`` returns :data:`MISSING` for an absent or expired entry; ``put`` evicts the least
    recently used beyond ``max_entries``. ``max_entries=0`` disables it."""

    __slots__ = ("_clock", "_data", "hits", "max_entries", "misses", "ttl")

    def __init__(
        self, max_entries: int, ttl: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"TokenCache(entries={len(self._data)}, max={self.max_entries}, ttl={self.ttl})"

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> Any:
        hit = self._data.get(key)
        if hit is None:
            self.misses += 1
            return MISSING
        expires, value = hit
        if self._clock() >= expires:
            del self._data[key]
            self.misses += 1
            return MISSING
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: Any) -> None:
        if self.max_entries <= 0:
            return
        self._data[key] = (self._clock() + self.ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def discard(self, predicate: Callable[[Hashable], bool]) -> None:
        for key in [k for k in self._data if predicate(k)]:
            del self._data[key]

    def clear(self) -> None:
        self._data.clear()
