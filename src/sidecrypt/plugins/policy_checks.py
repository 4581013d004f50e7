"""Start-up and check-config support for the policy: cross-checks, warnings, the stated default."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from . import identity
from .policy_model import split_ref

if TYPE_CHECKING:
    from ..config import Settings


def validate(settings: Settings) -> None:
    """Everything the models alone cannot check; ConfigError names file and dotted path.

    Covers the identity section too (JWT keys readable and usable).
    """
    identity.validate(settings)
    file = settings.source
    sources = identity.configured_sources(settings)
    routes = {r.label: r for r in settings.routes} | {r.match.path: r for r in settings.routes}

    def check_refs(values: tuple[str, ...], path: str, what: str) -> None:
        for j, value in enumerate(values):
            source, _ = split_ref(value)
            if source is not None and source not in sources:
                configured = ", ".join(sources) or "none"
                raise ConfigError(
                    f"{what} source {source!r} is not configured under identity "
                    f"(configured: {configured})",
                    file=file,
                    path=f"{path}[{j}]",
                )

    for i, rule in enumerate(settings.policy.rules):
        where = f"policy.rules[{i}]"
        if rule.key is not None and rule.key not in settings.keys:
            raise ConfigError(f"unknown key {rule.key!r}", file=file, path=f"{where}.key")
        if rule.route is not None:
            route = routes.get(rule.route)
            if route is None:
                raise ConfigError(
                    f"unknown route {rule.route!r}: name a configured route by its path pattern",
                    file=file,
                    path=f"{where}.route",
                )
            if rule.key is not None and route.key != rule.key:
                raise ConfigError(
                    f"route {rule.route!r} uses key {route.key!r}, so this rule never applies",
                    file=file,
                    path=f"{where}.key",
                )
        check_refs(rule.principals, f"{where}.principals", "principal")
        check_refs(rule.roles, f"{where}.roles", "role")
        for outcome, who in rule.tiers():
            check_refs(who.principals, f"{where}.{outcome}_for.principals", "principal")
            check_refs(who.roles, f"{where}.{outcome}_for.roles", "role")
    admins = settings.policy.admins
    check_refs(admins.principals, "policy.admins.principals", "principal")
    check_refs(admins.roles, "policy.admins.roles", "role")


def describe_default(settings: Settings) -> str:
    """One line for check-config: what callers get where no rule says otherwise."""
    cfg = settings.policy
    default = cfg.effective_default
    if not cfg.rules and default == "reveal":
        text = (
            "policy: no rules; decrypted response fields are revealed to any caller that "
            "reaches the sidecar (legacy transparent default; add policy.rules to restrict)"
        )
    elif not cfg.rules:
        text = f"policy: no rules; every decrypted response field gets {default!r}"
    else:
        why = "policy.default" if cfg.default is not None else "the default once rules exist"
        text = f"policy: {len(cfg.rules)} rule(s); fields no rule covers get {default!r} ({why})"
    admins = [*cfg.admins.principals, *(f"role {r}" for r in cfg.admins.roles)]
    who = ", ".join(admins) if admins else "nobody (policy.admins is empty)"
    return f"{text}; key administration: {who}"


def startup_warnings(settings: Settings) -> list[str]:
    """Things that are allowed but probably not meant; the proxy logs each at WARNING."""
    from .policy import PolicyEngine

    out: list[str] = []
    cfg = settings.policy
    engine = PolicyEngine(settings)
    if settings.mode == "server-side":
        why = "no policy rules configured" if not cfg.rules else "policy.default is 'reveal'"
        for route in settings.routes:
            fields = [
                f.path
                for f in route.response.decrypt
                if engine.decide(None, route.label, route.key, f.path, None) == "reveal"
            ]
            if fields:
                out.append(
                    f"server-side mode: route {route.label} decrypts {', '.join(fields)} in "
                    f"responses for any caller that reaches the sidecar ({why}); add "
                    "policy.rules to restrict who sees plaintext"
                )
    sources = identity.configured_sources(settings)
    names_callers = any(r.principals or r.roles or r.tiers() for r in cfg.rules)
    if names_callers and not sources:
        out.append(
            "policy.rules name principals or roles but no identity source is configured: "
            "every caller is anonymous and gets each rule's 'otherwise'"
        )
    header = settings.identity.header
    if header is not None and any(c.endswith("/0") for c in header.trusted_cidrs):
        out.append("identity.header.trusted_cidrs trusts every address: anyone can set identity")
    tls = settings.listen.tls
    if settings.identity.mtls is not None and (tls is None or tls.client_ca is None):
        out.append(
            "identity.mtls is set but listen.tls.client_ca is not: no client certificate is "
            "ever requested, so no caller is identified by certificate"
        )
    return out
