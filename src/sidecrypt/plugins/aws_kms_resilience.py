"""Failure handling for remote key services: call counters, a circuit breaker, jittered backoff.

Nothing here knows AWS. Kept apart from the KMS provider so the rules can be read (and tested)
on their own: a remote call is either answered, refused for a reason that retrying cannot fix,
or failed in a way that might pass (throttling, 5xx). Only the last kind is retried.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

BreakerState = Literal["closed", "open", "half_open"]


def backoff_delay(
    attempt: int, *, base: float = 0.05, cap: float = 1.0, rand: Callable[[], float] = random.random
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)).

    Jitter spreads the retries of many sidecars so a throttled KMS is not hit in lock step.
    """
    return rand() * min(cap, base * 2.0**attempt)


class CallStats:
    """KMS requests by operation and outcome, for the metrics plugin and for tests.

    ``calls[(op, outcome)]`` counts requests actually sent (every attempt, retries included);
    ``short_circuited[op]`` counts calls refused locally because the breaker was open.
    Outcomes: ok, invalid_ciphertext, rejected, throttled, server_error, timeout,
    connection_error, error.
    """

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self.short_circuited: Counter[str] = Counter()
        self.retries = 0
        self.breaker_opened = 0

    def record(self, op: str, outcome: str) -> None:
        self.calls[(op, outcome)] += 1

    def count(self, op: str, outcome: str | None = None) -> int:
        """Requests sent for ``op`` (with ``outcome`` only, if given)."""
        return sum(n for (o, out), n in self.calls.items() if o == op and outcome in (None, out))

    def snapshot(self) -> dict[str, Any]:
        """A plain copy: ``{"calls": {op: {outcome: n}}, "short_circuited": {...}, ...}``."""
        calls: dict[str, dict[str, int]] = {}
        for (op, outcome), n in sorted(self.calls.items()):
            calls.setdefault(op, {})[outcome] = n
        return {
            "calls": calls,
            "short_circuited": dict(self.short_circuited),
            "retries": self.retries,
            "breaker_opened": self.breaker_opened,
        }

    def __repr__(self) -> str:
        return f"CallStats({self.snapshot()!r})"


class CircuitBreaker:
    """Opens after ``failures`` consecutive failed calls; fails fast while open.

    After ``reset`` seconds it lets exactly one trial call through (half-open): success closes
    it, failure opens it for another ``reset`` seconds. A caller that was allowed through must
    end with :meth:`success`, :meth:`failure` or :meth:`release` (cancelled: no verdict).
    """

    def __init__(
        self, failures: int, reset: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = failures
        self.reset = reset
        self._clock = clock
        self.consecutive = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._trial or self._clock() >= self._opened_at + self.reset:
            return "half_open"
        return "open"

    def retry_after(self) -> float:
        """Seconds until a trial call may go through (0 when closed)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.reset - self._clock())

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        if self._trial or self._clock() < self._opened_at + self.reset:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        self.consecutive = 0
        self._opened_at = None
        self._trial = False

    def failure(self) -> bool:
        """Count a failure; True when this one opened (or re-opened) the breaker."""
        self.consecutive += 1
        reopened = self._trial
        self._trial = False
        if reopened or (self._opened_at is None and self.consecutive >= self.threshold):
            self._opened_at = self._clock()
            return True
        return False

    def release(self) -> None:
        self._trial = False
