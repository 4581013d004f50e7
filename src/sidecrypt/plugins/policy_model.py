"""The ``policy:`` config section: who may have which decrypted fields revealed, and key admins.

Kept apart from the plugin (policy.py) so config.py can import the models without the engine.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from ..decisions import PURPOSE
from ..selectors import INDEX, SelectorError, compile_selector
from .identity import SOURCES

Outcome = Literal["reveal", "mask", "ciphertext", "drop", "deny"]
Otherwise = Literal["mask", "ciphertext", "drop", "deny"]


def split_ref(value: str) -> tuple[str | None, str]:
    """``jwt:admin`` -> ("jwt", "admin"); ``spiffe://x`` and ``admin`` have no source."""
    head, sep, rest = value.partition(":")
    if not sep or rest.startswith("//"):
        return None, value
    return head, rest


def _ref_checker(what: str) -> AfterValidator:
    def check(value: str) -> str:
        source, name = split_ref(value)
        if source is not None and source not in SOURCES:
            raise ValueError(
                f"unknown {what} source {source!r} (known: {', '.join(SOURCES)}); "
                f"write SOURCE:NAME, e.g. jwt:{name}"
            )
        if not name:
            raise ValueError(f"empty {what} name")
        return value

    return AfterValidator(check)


PrincipalRef = Annotated[str, _ref_checker("principal")]
RoleRef = Annotated[str, _ref_checker("role")]


def _purpose(value: str) -> str:
    if value != "*" and not PURPOSE.match(value):
        raise ValueError("a purpose is 1-64 of A-Z a-z 0-9 . _ : / - (or '*' for any)")
    return value


def _policy_field(value: str) -> str:
    try:
        selector = compile_selector(value)
    except SelectorError as exc:
        raise ValueError(str(exc)) from None
    if any(kind == INDEX for kind, _ in selector.steps):
        raise ValueError("policy applies to every array element alike: write [*], not an index")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaskConfig(_Model):
    """Strings keep at most ``keep_last`` trailing characters, and never more than half."""

    keep_last: Annotated[int, Field(ge=0, le=64)] = 4
    char: Annotated[str, Field(min_length=1, max_length=1)] = "*"


class Audience(_Model):
    """Callers by principal (``mtls:billing``, ``spiffe://...``) or role (``jwt:auditor``)."""

    principals: tuple[PrincipalRef, ...] = ()
    roles: tuple[RoleRef, ...] = ()


class PolicyRule(_Model):
    """First rule whose key/route/fields match decides a field (empty ones match everything).

    Callers in ``principals``/``roles`` (with a declared purpose from ``purposes``, when given)
    get ``reveal``; then ``mask_for``, ``ciphertext_for`` and ``drop_for`` are tried in that
    order; everyone else gets ``otherwise``.
    """

    key: str | None = None
    route: str | None = None
    fields: tuple[Annotated[str, AfterValidator(_policy_field)], ...] = ()
    principals: tuple[PrincipalRef, ...] = ()
    roles: tuple[RoleRef, ...] = ()
    purposes: tuple[Annotated[str, AfterValidator(_purpose)], ...] = ()
    mask_for: Audience | None = None
    ciphertext_for: Audience | None = None
    drop_for: Audience | None = None
    otherwise: Otherwise = "ciphertext"
    mask: MaskConfig | None = None

    def tiers(self) -> tuple[tuple[str, Audience], ...]:
        """The non-reveal audiences in the order they are tried."""
        pairs = (
            ("mask", self.mask_for),
            ("ciphertext", self.ciphertext_for),
            ("drop", self.drop_for),
        )
        return tuple((outcome, who) for outcome, who in pairs if who is not None)


class PolicyConfig(_Model):
    default: Outcome | None = None  # fields no rule covers; unset: see effective_default
    purpose_header: Annotated[str, Field(min_length=1)] = "X-Purpose"
    mask: MaskConfig = MaskConfig()
    admins: Audience = Audience()  # who may administer keys (admin endpoints), not use them
    rules: tuple[PolicyRule, ...] = ()

    @field_validator("purpose_header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9\-]+", value):
            raise ValueError("not an HTTP header name")
        return value

    @property
    def effective_default(self) -> Outcome:
        if self.default is not None:
            return self.default
        return "ciphertext" if self.rules else "reveal"
