"""Audit events: what happened to which key, for whom. Never values, never key bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["ok", "error", "denied", "masked", "ciphertext", "dropped", "revealed"]


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One key use or decision, CloudTrail-style.

    ``action`` is one of: ``generate_data_key``, ``decrypt_data_key``, ``encrypt_fields``,
    ``decrypt_fields``, ``reveal``, ``request_failed``, ``key_create``, ``key_rotate``,
    ``rewrap``. Context values are recorded (like KMS encryption context, they are not secret);
    field *paths* are recorded, field values never are.
    """

    action: str
    outcome: Outcome = "ok"
    key: str | None = None
    provider: str | None = None
    key_version: int | None = None
    context: dict[str, str] | None = None
    fields: tuple[str, ...] = ()
    count: int = 0
    cache: Literal["hit", "miss"] | None = None
    request_id: str | None = None
    route: str | None = None
    principal: str | None = None
    purpose: str | None = None
    error: str | None = None
    step: str | None = None
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict without empty members, for JSON sinks."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if value is None or value == () or (name == "count" and value == 0):
                continue
            out[name] = list(value) if isinstance(value, tuple) else value
        return out
