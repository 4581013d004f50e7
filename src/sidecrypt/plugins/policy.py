"""Reveal policy: which callers get which decrypted response fields, and what everyone else sees.

Rules (``policy.rules``) are tried in order; the first whose ``key``, ``route`` and ``fields`` match
a field decides it: callers named in ``principals`` or holding one of ``roles`` (and declaring one
of ``purposes`` when given, via the ``X-Purpose`` header) get ``reveal``; callers in ``mask_for``,
``ciphertext_for`` or ``drop_for`` (tried in that order) get that outcome; everyone else gets the
rule's ``otherwise``: ``ciphertext`` (the field stays encrypted), ``mask``, ``drop`` or ``deny``
(the whole response becomes 403)::

    policy:
      purpose_header: X-Purpose
      mask: {keep_last: 4, char: "*"}
      admins: {roles: ["jwt:key-admin"]}
      rules:
        - key: app
          route: "/users/**"
          fields: ["$.ssn", "$.card.number"]
          roles: [billing]                     # reveal
          purposes: [billing, fraud-review]    # ...only with one of these declared
          mask_for: {roles: [support]}
          ciphertext_for: {principals: ["mtls:batch.internal"]}
          otherwise: deny

Default, stated: with **no rules**, every decrypted field is revealed to any caller that reaches
the sidecar. That is the legacy expectation in server-side mode (the app behind the sidecar
served plaintext before it; its callers must not notice encryption at rest), and in client-side
mode the sidecar serves its own host. Server-side mode warns at start-up when this applies.
As soon as rules exist, fields no rule covers get ``ciphertext`` (fail closed); ``policy.default``
overrides either default. Key administration is separate: only ``policy.admins`` may use admin
endpoints; nobody may when the list is empty.

Per-app state: the module-level ``sidecrypt_app`` hook registers a :class:`PolicyEngine` on the
app's plugin manager; its ``sidecrypt_authorize`` and ``sidecrypt_mask`` (trylast) answer for the
built-in policy. The proxy asks through the hooks only (``sidecrypt.decisions.Decider``, once per
request); ``Decider``, ``make_decider`` and ``purpose_of`` stay importable from here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from .. import appkeys, hookimpl
from ..decisions import AUDIT_OUTCOME, OUTCOMES, Decider, principal_label, purpose_of
from ..identity import Principal
from ..selectors import DESCEND, INDEX, MEMBER, WILD, compile_selector
from . import _per_app, identity
from .policy_checks import describe_default, startup_warnings, validate
from .policy_model import MaskConfig, PolicyConfig, split_ref

if TYPE_CHECKING:
    from aiohttp import web

    from ..config import Settings

log = logging.getLogger(__name__)

PLUGIN_NAME = "sidecrypt.policy.per-app"
_CACHE_LIMIT = 4096
Steps = tuple[tuple[str, Any], ...]
Refs = tuple[tuple[str | None, str], ...]


def _steps_match(rule: Steps, i: int, field: Steps, j: int) -> bool:
    """Does selector ``rule`` cover every node selector/label ``field`` can reach?"""
    if i == len(rule):
        return j == len(field)
    if j == len(field):
        return False
    kind, arg = rule[i]
    fkind, farg = field[j]
    if kind == DESCEND:
        if fkind in (MEMBER, DESCEND) and farg == arg and _steps_match(rule, i + 1, field, j + 1):
            return True
        return fkind != DESCEND and _steps_match(rule, i, field, j + 1)
    # MEMBER: the same member; WILD: any member or element
    ok = (fkind == MEMBER and farg == arg) if kind == MEMBER else fkind in (MEMBER, WILD, INDEX)
    return ok and _steps_match(rule, i + 1, field, j + 1)


def field_matches(rule_field: str, field: str) -> bool:
    if rule_field == field:
        return True
    return _steps_match(compile_selector(rule_field).steps, 0, compile_selector(field).steps, 0)


def _refs(values: tuple[str, ...]) -> Refs:
    return tuple(split_ref(v) for v in values)


def _matches(principal: Principal | None, principals: Refs, roles: Refs) -> bool:
    if principal is None:
        return False
    for source, name in principals:
        if (source is None or source == principal.source) and name in (principal.id, "*"):
            return True
    for source, name in roles:
        if (source is None or source == principal.source) and name in principal.roles:
            return True
    return False


def route_matches(rule_route: str, route_label: str) -> bool:
    """A rule names a route by its label (``GET|POST /users/**``) or by its path pattern."""
    return rule_route in (route_label, route_label.partition(" ")[2])


@dataclass(frozen=True, slots=True)
class _Rule:
    key: str | None
    route: str | None
    fields: tuple[str, ...]
    principals: Refs
    roles: Refs
    purposes: frozenset[str]
    tiers: tuple[tuple[str, Refs, Refs], ...]
    otherwise: str
    mask: MaskConfig


class PolicyEngine:
    """Per-app compiled policy. Field matching is cached per (route, key, field)."""

    def __init__(self, settings: Settings) -> None:
        cfg: PolicyConfig = settings.policy
        self.default = cfg.effective_default
        self.default_mask = cfg.mask
        self.rules = tuple(
            _Rule(
                r.key,
                r.route,
                r.fields,
                _refs(r.principals),
                _refs(r.roles),
                frozenset(r.purposes),
                tuple((o, _refs(a.principals), _refs(a.roles)) for o, a in r.tiers()),
                r.otherwise,
                r.mask or cfg.mask,
            )
            for r in cfg.rules
        )
        self._applicable: dict[tuple[str, str | None, str], _Rule | None] = {}
        self._ruled_routes: dict[tuple[str, str | None], bool] = {}

    def uniform_outcome(
        self, principal: Principal | None, route: str, key: str | None, purpose: str | None
    ) -> str | None:
        """The default when no rule can apply to any field of this route and key (so every
        field gets it: one lookup per request instead of a decision per field); else None."""
        cache_key = (route, key)
        ruled = self._ruled_routes.get(cache_key)
        if ruled is None:
            ruled = any(
                (rule.key is None or rule.key == key)
                and (rule.route is None or route_matches(rule.route, route))
                for rule in self.rules
            )
            if len(self._ruled_routes) >= _CACHE_LIMIT:
                self._ruled_routes.clear()
            self._ruled_routes[cache_key] = ruled
        return None if ruled else self.default

    def rule_for(self, route: str, key: str | None, field: str) -> _Rule | None:
        cache_key = (route, key, field)
        try:
            return self._applicable[cache_key]
        except KeyError:
            pass
        found = None
        for rule in self.rules:
            if rule.key is not None and rule.key != key:
                continue
            if rule.route is not None and not route_matches(rule.route, route):
                continue
            if rule.fields and not any(field_matches(f, field) for f in rule.fields):
                continue
            found = rule
            break
        if len(self._applicable) >= _CACHE_LIMIT:  # labels under $.* can be caller-chosen
            self._applicable.clear()
        self._applicable[cache_key] = found
        return found

    def decide(
        self,
        principal: Principal | None,
        route: str,
        key: str | None,
        field: str,
        purpose: str | None,
    ) -> str:
        rule = self.rule_for(route, key, field)
        if rule is None:
            return self.default
        if _matches(principal, rule.principals, rule.roles) and (
            not rule.purposes or (purpose and (purpose in rule.purposes or "*" in rule.purposes))
        ):
            return "reveal"
        for outcome, principals, roles in rule.tiers:
            if _matches(principal, principals, roles):
                return outcome
        return rule.otherwise

    def mask_for(self, route: str, key: str | None, field: str) -> MaskConfig:
        rule = self.rule_for(route, key, field)
        return rule.mask if rule is not None else self.default_mask

    @hookimpl(trylast=True)
    def sidecrypt_authorize(
        self,
        principal: Principal | None,
        action: str,
        route: str,
        field: str,
        key: str | None,
        purpose: str | None,
    ) -> str | None:
        if action != "decrypt":
            return None
        return self.decide(principal, route, key, field, purpose)

    @hookimpl(trylast=True)
    def sidecrypt_mask(self, route: str, key: str | None, field: str, value: Any) -> str | None:
        return mask_value(value, self.mask_for(route, key, field))


def mask_value(value: Any, mask: MaskConfig) -> str:
    """Strings and numbers keep their last characters (at most half); anything else is hidden."""
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        return mask.char * 8
    text = value if isinstance(value, str) else str(value)
    keep = min(mask.keep_last, len(text) // 2)
    return mask.char * (len(text) - keep) + text[len(text) - keep :]


def make_decider(
    pm: pluggy.PluginManager,
    principal: Principal | None,
    route_label: str,
    key_name: str | None,
    purpose: str | None,
) -> Decider:
    """The same as ``Decider(...)``; kept for callers of the old name."""
    return Decider(pm, principal, route_label, key_name, purpose)


def may_administer(principal: Principal | None, settings: Settings) -> bool:
    """Key administration (create, rotate, re-wrap through admin endpoints), not key use."""
    admins = settings.policy.admins
    return _matches(principal, _refs(admins.principals), _refs(admins.roles))


__all__ = [
    "AUDIT_OUTCOME",
    "OUTCOMES",
    "Decider",
    "PolicyEngine",
    "describe_default",
    "install",
    "make_decider",
    "mask_value",
    "may_administer",
    "principal_label",
    "purpose_of",
    "startup_warnings",
    "validate",
]


def install(pm: pluggy.PluginManager, settings: Settings) -> PolicyEngine:
    """Register (or replace) this app's PolicyEngine on ``pm``."""
    return _per_app.install(pm, PLUGIN_NAME, PolicyEngine(settings))


@hookimpl(trylast=True)
def sidecrypt_check_config(settings: Settings) -> list[str]:
    """Validate identity and policy; notes: sources, the stated default, then warnings."""
    validate(settings)
    notes = [identity.describe(settings), describe_default(settings)]
    return notes + [f"warning: {w}" for w in startup_warnings(settings)]


@hookimpl(trylast=True)
def sidecrypt_app(app: web.Application, settings: Settings) -> None:
    """Install the engine and say at start-up what is allowed but probably not meant."""
    install(app[appkeys.PLUGIN_MANAGER], settings)
    for warning in startup_warnings(settings):
        log.warning(warning)
