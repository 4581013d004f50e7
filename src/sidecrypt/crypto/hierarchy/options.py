"""The ``hierarchy:`` option of a key: its branch keys' store, rotation and cache bounds."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_CONTEXT_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def parse_duration(value: Any) -> float:
    """Seconds from a number or ``30d``/``12h``/``15m``/``45s``/``2w``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or e.g. 30d, 12h, 15m")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if match is None:
        raise ValueError("a duration is a number of seconds or e.g. 30d, 12h, 15m")
    return float(match.group(1)) * _UNITS[match.group(2)]


class HierarchyOptions(BaseModel):
    """``keys.<name>.hierarchy``: data keys come from branch keys kept wrapped in a store.

    ``per`` names a context entry (e.g. ``tenant``): each value gets its own branch key, so
    tenants never share key material and one can be forgotten alone. ``refresh`` bounds how
    long a sidecar takes to see a new active version, a rotation or a forgotten branch.
    ``cache_ttl`` is how long an unwrapped branch key version is kept (one provider call per
    version per TTL per process).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = Field("default", min_length=1)
    rotate_every: float | None = Field(None, description="seconds; None: rotate on demand only")
    per: str | None = None
    refresh: float = Field(30.0, description="seconds")
    cache_ttl: float = Field(3600.0, description="seconds")

    @field_validator("rotate_every", "refresh", "cache_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return None if value is None else parse_duration(value)

    @field_validator("rotate_every")
    @classmethod
    def _rotation(cls, value: float | None) -> float | None:
        if value is not None and value < 60:
            raise ValueError("rotate_every must be at least 60 seconds")
        return value

    @field_validator("refresh", "cache_ttl")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not 0 < value <= 7 * 86400:
            raise ValueError("must be more than 0 and at most 7 days")
        return value

    @field_validator("per")
    @classmethod
    def _per(cls, value: str | None) -> str | None:
        if value is not None and not _CONTEXT_NAME.match(value):
            raise ValueError("per names one encryption context entry, e.g. tenant")
        return value
