"""One request's reveal decisions, asked of plugins through hooks only.

The proxy builds a :class:`Decider` per response that decrypts fields. It asks
``sidecrypt_authorize`` once per field label and ``sidecrypt_mask`` for masked values; it knows
no policy engine, so a third-party policy plugin can replace the built-in one entirely.
Fail closed: when no plugin answers, a field stays ``ciphertext``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .errors import PluginError, RequestError
from .events import AuditEvent, new_event
from .events import Outcome as AuditOutcome
from .hookcall import DirectHook
from .identity import Principal

if TYPE_CHECKING:
    import pluggy

    from .config import Settings
    from .proxy.incoming import RequestView

OUTCOMES = frozenset({"reveal", "mask", "ciphertext", "drop", "deny"})
AUDIT_OUTCOME: dict[str, AuditOutcome] = {
    "reveal": "revealed",
    "mask": "masked",
    "ciphertext": "ciphertext",
    "drop": "dropped",
    "deny": "denied",
}
_UNKNOWN = "?"  # Decider._uniform before it is looked up (not an outcome)
PURPOSE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/\-]{0,63}$")
MASK = "****"


def default_mask(value: Any) -> str:
    """Strings of 8 or more characters keep their last 4; anything else is fully masked."""
    if isinstance(value, str) and len(value) >= 8:
        return MASK + value[-4:]
    return MASK


def principal_label(principal: Principal | None) -> str | None:
    """How a principal appears in audit records: ``source:id``."""
    return None if principal is None else f"{principal.source}:{principal.id}"


def purpose_of(request: RequestView, settings: Settings) -> str | None:
    """The declared purpose (``X-Purpose``), or None; a malformed one is a 400, never logged."""
    header = settings.policy.purpose_header
    value = request.headers.get(header, "").strip()
    if not value:
        return None
    if not PURPOSE.match(value):
        raise RequestError(
            f"the {header} header must be 1-64 of A-Z a-z 0-9 . _ : / -", code="bad_purpose"
        )
    return value


class Decider:
    """One request's decisions: ``decider(label) -> outcome``, cached per label.

    ``None`` from every plugin means no policy is installed: fail closed with ``ciphertext``.
    An outcome outside the five known ones is a plugin bug (PluginError).
    """

    __slots__ = (
        "_args",
        "_authorize",
        "_mask",
        "_uniform",
        "decisions",
        "key",
        "principal",
        "purpose",
        "route",
    )

    def __init__(
        self,
        pm: pluggy.PluginManager,
        principal: Principal | None,
        route: str,
        key: str | None,
        purpose: str | None,
        *,
        authorize: DirectHook | None = None,
    ) -> None:
        # A DirectHook kept by the caller (the proxy keeps one per app) saves ~0.7 µs per field.
        self._authorize = authorize or DirectHook(pm.hook.sidecrypt_authorize)
        self._mask = pm.hook.sidecrypt_mask
        self.principal, self.route, self.key, self.purpose = principal, route, key, purpose
        self._args: dict[str, Any] | None = None  # the hook's arguments, built when first asked
        self.decisions: dict[str, str] = {}
        self._uniform: str | None = _UNKNOWN

    def _route_outcome(self) -> str | None:
        """One answer for every field of this request, when the only ``sidecrypt_authorize``
        implementation offers it (``uniform_outcome(principal, route, key, purpose)``: the
        built-in policy when none of its rules can apply to this route and key); else None."""
        plan = self._authorize.plan()
        if plan is None or len(plan) != 1:
            return None
        uniform = getattr(getattr(plan[0][0], "__self__", None), "uniform_outcome", None)
        if uniform is None:
            return None
        outcome: str | None = uniform(self.principal, self.route, self.key, self.purpose)
        return outcome

    def __call__(self, field: str) -> str:
        outcome = self.decisions.get(field)
        if outcome is None:
            outcome = self._uniform
            if outcome is _UNKNOWN:
                outcome = self._uniform = self._route_outcome()
            if outcome is None:
                args = self._args
                if args is None:
                    args = self._args = {
                        "principal": self.principal,
                        "action": "decrypt",
                        "route": self.route,
                        "field": field,
                        "key": self.key,
                        "purpose": self.purpose,
                    }
                else:
                    args["field"] = field
                outcome = self._authorize(args)
            if outcome is None:
                outcome = "ciphertext"
            elif outcome not in OUTCOMES:
                raise PluginError(f"sidecrypt_authorize returned an unknown outcome for {field}")
            self.decisions[field] = outcome
        return outcome

    def mask(self, field: str, value: Any) -> str:
        """The masked form of a decrypted value whose outcome is ``mask``."""
        masked = self._mask(route=self.route, key=self.key, field=field, value=value)
        if masked is None:
            return default_mask(value)
        if not isinstance(masked, str):
            raise PluginError(f"sidecrypt_mask returned a non-string for {field}")
        return masked

    @property
    def denied(self) -> bool:
        return "deny" in self.decisions.values()

    def audit_events(
        self, *, request_id: str | None = None, context: dict[str, str] | None = None
    ) -> list[AuditEvent]:
        """One ``reveal`` event per outcome, naming the fields, for this request."""
        decisions = self.decisions
        if not decisions:
            return []
        outcomes = set(decisions.values())
        groups: list[tuple[str, tuple[str, ...]]]
        if len(outcomes) == 1:  # the usual case: one outcome for every field (in order)
            groups = [(outcomes.pop(), tuple(decisions))]
        else:  # outcomes in order of first appearance, each with its fields in order
            by_outcome: dict[str, list[str]] = {}
            for field, outcome in decisions.items():
                by_outcome.setdefault(outcome, []).append(field)
            groups = [(outcome, tuple(fields)) for outcome, fields in by_outcome.items()]
        principal = principal_label(self.principal)
        return [
            new_event(
                "reveal",
                outcome=AUDIT_OUTCOME[outcome],
                key=self.key,
                route=self.route,
                principal=principal,
                purpose=self.purpose,
                fields=fields,
                count=len(fields),
                request_id=request_id,
                context=context,
            )
            for outcome, fields in groups
        ]
