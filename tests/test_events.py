"""AuditEvent: immutable, time defaults to now, and new_event builds the very same thing."""

from __future__ import annotations

import time

from sidecrypt.events import AuditEvent, new_event


def test_new_event_is_an_audit_event_with_the_same_fields() -> None:
    kwargs = {
        "outcome": "masked",
        "key": "app",
        "provider": "local",
        "context": {"tenant": "acme"},
        "fields": ("$.ssn",),
        "count": 1,
        "request_id": "r1",
        "route": "POST /records/**",
        "principal": "jwt:alice",
        "purpose": "audit",
        "time": 12.5,
    }
    made = new_event("reveal", **kwargs)  # type: ignore[arg-type]
    assert type(made) is AuditEvent
    assert made == AuditEvent("reveal", **kwargs)  # type: ignore[arg-type]
    assert made.to_dict()["fields"] == ["$.ssn"]


def test_time_defaults_to_now() -> None:
    before = time.time()
    event = new_event("encrypt_fields")
    assert before <= event.time <= time.time()
    assert (event.outcome, event.fields, event.count, event.key) == ("ok", (), 0, None)
