"""Tokens on the wire: tokenize selected JSON fields and lookup parameters, detokenize on the
way out under the reveal policy.

A route's token rules are compiled once (:func:`compile_token_rules`). On a request, the
selected values (and the named query and path parameters) are replaced by their tokens before
anything is forwarded; a value that does not fit its format is the client's 400, a vault that
cannot answer a 503: nothing leaves unprotected. On a response, the tokens at the selected
slots are resolved in one vault call and then revealed, masked, left as tokens (the
``ciphertext`` outcome), dropped, or the response denied, as the policy decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

from .. import config, keys
from ..decisions import default_mask
from ..errors import AccessDenied, ConfigError, PluginError, RequestError
from ..tokens.cache import MISSING
from ..tokens.formats import TokenFormat, build_format
from ..tokens.vault import Vault
from ..transform.duplicates import check_duplicates
from ..transform.guard import GuardPlan
from .fields import _find, _parse, _serialise
from .routes import CompiledField, compile_fields

Decide = Callable[[str], str]


@dataclass(frozen=True, slots=True)
class TokenRule:
    field: CompiledField
    format: TokenFormat
    consistent: bool


@dataclass(frozen=True, slots=True)
class TokenRules:
    """A route's compiled token rules (request and response sides, lookup parameters)."""

    request_tokenize: tuple[TokenRule, ...] = ()  # TokenRuleList when compiled
    request_detokenize: tuple[TokenRule, ...] = ()
    response_tokenize: tuple[TokenRule, ...] = ()
    response_detokenize: tuple[TokenRule, ...] = ()
    query: tuple[tuple[str, TokenFormat], ...] = ()
    path: tuple[tuple[str, int, TokenFormat], ...] = ()  # (name, raw path segment index, format)

    @property
    def request(self) -> bool:
        return bool(self.request_tokenize or self.request_detokenize)

    @property
    def response(self) -> bool:
        return bool(self.response_tokenize or self.response_detokenize)

    @property
    def lookups(self) -> bool:
        return bool(self.query or self.path)


class TokenRuleList(tuple[TokenRule, ...]):
    """A side's token rules, with their fields compiled once for the guard (transform/guard.py):
    keys that fold or split to a selected name, and protected names out of place."""

    guard: GuardPlan

    def __new__(cls, rules: Sequence[TokenRule] = ()) -> TokenRuleList:
        self = super().__new__(cls, rules)
        self.guard = GuardPlan([r.field for r in rules])
        return self


def _rules(specs: Sequence[config.TokenField]) -> TokenRuleList:
    fields = compile_fields([config.FieldSpec(path=s.path, required=s.required) for s in specs])
    return TokenRuleList(
        [
            TokenRule(
                f,
                build_format(s.format, s.format_options(), consistent=s.consistent),
                s.consistent,
            )
            for f, s in zip(fields, specs, strict=True)
        ]
    )


def _guard(rules: Sequence[TokenRule]) -> GuardPlan:
    return rules.guard if isinstance(rules, TokenRuleList) else TokenRuleList(rules).guard


def _spec_format(spec: config.TokenSpec) -> TokenFormat:
    return build_format(spec.format, spec.format_options(), consistent=spec.consistent)


def compile_token_rules(index: int, route: config.Route) -> TokenRules | None:
    if not route.has_tokens:
        return None
    segments = route.match.path.split("/")[1:]
    path = []
    for name, spec in route.lookup.path.items():
        where = f"routes[{index}].lookup.path.{name}"
        if f"{{{name}}}" not in segments:
            raise ConfigError(f"the pattern has no {{{name}}}", path=where)
        at = segments.index(f"{{{name}}}")
        if "**" in segments[:at]:
            raise ConfigError(f"{{{name}}} must come before any '**' segment", path=where)
        path.append((name, at + 1, _spec_format(spec)))
    return TokenRules(
        request_tokenize=_rules(route.request.tokenize),
        request_detokenize=_rules(route.request.detokenize),
        response_tokenize=_rules(route.response.tokenize),
        response_detokenize=_rules(route.response.detokenize),
        query=tuple((name, _spec_format(spec)) for name, spec in route.lookup.query.items()),
        path=tuple(path),
    )


def _slots(
    doc: Any, rules: Sequence[TokenRule], *, required: bool
) -> list[tuple[Any, Any, str, TokenRule]]:
    """(container, key, label, rule) per selected slot, each slot once (first rule wins)."""
    seen: set[tuple[str | int, ...]] = set()
    out = []
    for rule in rules:
        found = _find(doc, rule.field)
        if required and rule.field.required and not found:
            raise RequestError(
                f"required field {rule.field.text} is missing from the body", code="missing_field"
            )
        for container, key, concrete, label in found:
            if concrete not in seen:
                seen.add(concrete)
                out.append((container, key, label, rule))
    return out


class TokenFields:
    """Token transforms for the proxy, on one vault."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault

    async def tokenize_body(
        self,
        body: bytes,
        name: str,
        rules: Sequence[TokenRule],
        context: keys.Context,
    ) -> tuple[bytes, list[str]]:
        """Replace each selected value by its token (nulls stay null).

        As on an encrypting route (fields.py): duplicate keys and keys of one object that fold
        alike are refused, keys that fold or split to a selected place are tokenized under its
        label, a protected name out of place is refused, and the outgoing document is read once
        more (500 ``plaintext_guard``) before it leaves.
        """
        doc = _parse(body)
        check_duplicates(body, doc)
        guard = _guard(rules)
        slots = _slots(doc, rules, required=True)
        if guard:
            have = {(id(c), k) for c, k, _, _ in slots}
            for container, key, lab, index in guard.find_slots(doc):
                if (id(container), key) not in have:
                    have.add((id(container), key))
                    slots.append((container, key, lab, rules[index]))
        slots = [s for s in slots if s[0][s[1]] is not None]
        if not slots:
            if guard:
                guard.check_outgoing(doc, sealed=lambda c, k: c[k] is None)
            return body, []
        items = []
        for container, key, _label, rule in slots:
            items.append((rule.format, rule.consistent, container[key]))
        tokens = await self.vault.tokenize(name, context, items, [s[2] for s in slots])
        for (container, key, _, _), token, (_, _, value) in zip(slots, tokens, items, strict=True):
            if token == value or token is None:  # formats never yield the value: guard anyway
                raise RequestError("a token equals its value; nothing was sent", status=500)
            container[key] = token
        if guard:
            replaced = {(id(c), k) for c, k, _, _ in slots}
            guard.check_outgoing(doc, sealed=lambda c, k: c[k] is None or (id(c), k) in replaced)
        return _serialise(doc), [s[2] for s in slots]

    async def detokenize_body(
        self,
        body: bytes,
        name: str,
        rules: Sequence[TokenRule],
        context: keys.Context,
        *,
        decide: Decide | None = None,
    ) -> tuple[bytes, list[str], list[tuple[str, str]]]:
        """Resolve tokens at the selected slots under the policy; returns the body, the labels
        revealed or masked, and (label, outcome) for the others."""
        doc = _parse(body)
        slots = _slots(doc, rules, required=False)
        if not slots:
            return body, [], []
        masker: Callable[[str, Any], str] = getattr(decide, "mask", None) or (
            lambda label, value: default_mask(value)
        )
        outcomes: list[tuple[str, str]] = []
        wanted: list[tuple[Any, Any, str, TokenRule, str]] = []
        drops: list[tuple[Any, Any]] = []
        for container, key, label, rule in slots:
            value = container[key]
            outcome = decide(label) if decide is not None else "reveal"
            if outcome not in ("reveal", "mask", "ciphertext", "drop", "deny"):
                raise PluginError(f"policy returned an unknown outcome for {label}")
            if outcome == "deny":
                raise AccessDenied(f"access to field {label} is denied")
            if outcome == "drop":
                drops.append((container, key))
                outcomes.append((label, "dropped"))
            elif outcome == "ciphertext":  # here: the token itself
                outcomes.append((label, "ciphertext"))
            elif value is not None:
                wanted.append((container, key, label, rule, outcome))
        labels: list[str] = []
        if wanted:
            lookups = [
                (w[3].format, w[0][w[1]]) if w[3].format.matches(w[0][w[1]]) else None
                for w in wanted
            ]
            asked = [x for x in lookups if x is not None]
            values = iter(await self.vault.detokenize(name, context, asked) if asked else ())
            for (container, key, label, _, outcome), lookup in zip(wanted, lookups, strict=True):
                value = next(values) if lookup is not None else MISSING
                if (
                    value is MISSING
                ):  # not a token of this vault: left as is, masked unless revealed
                    if outcome == "mask":
                        container[key] = masker(label, container[key])
                        outcomes.append((label, "masked"))
                    continue
                if outcome == "mask":
                    container[key] = masker(label, value)
                    outcomes.append((label, "masked"))
                else:
                    container[key] = value
                labels.append(label)
        for container, key in reversed(drops):
            if isinstance(container, dict):
                del container[key]
            else:
                container[key] = None
        return _serialise(doc), labels, outcomes

    async def lookup_target(
        self, raw_path: str, name: str, rules: TokenRules, context: keys.Context
    ) -> tuple[str, list[str]]:
        """The raw target with lookup parameters replaced by their consistent tokens."""
        path, sep, query = raw_path.partition("?")
        segments = path.split("/")
        items: list[tuple[TokenFormat, bool, Any]] = []
        where: list[tuple[str, int]] = []  # ("path", segment) or ("query", part index)
        labels: list[str] = []
        for pname, at, fmt in rules.path:
            if at >= len(segments) or ";" in segments[at]:
                raise RequestError(
                    f"path parameter {pname} cannot be read unambiguously", code="ambiguous_lookup"
                )
            items.append((fmt, True, unquote(segments[at])))
            where.append(("path", at))
            labels.append(f"path:{pname}")
        parts = query.split("&") if query else []
        if rules.query and parts:
            names = {q: fmt for q, fmt in rules.query}
            folded = {q.casefold() for q in names}
            if ";" in query:
                raise RequestError(
                    "a query with ';' on a lookup route is ambiguous", code="ambiguous_lookup"
                )
            for i, part in enumerate(parts):
                raw_name, _eq, raw_value = part.partition("=")
                qname = unquote_plus(raw_name)
                if qname in names:
                    items.append((names[qname], True, unquote_plus(raw_value)))
                    where.append(("query", i))
                    labels.append(f"query:{qname}")
                elif qname.casefold() in folded or qname.split("[", 1)[0].casefold() in folded:
                    raise RequestError(
                        f"query parameter {qname!r} could be read as a lookup parameter",
                        code="ambiguous_lookup",
                    )
        if not items:
            return raw_path, []
        tokens = await self.vault.tokenize(name, context, items, labels)
        for (kind, at), token in zip(where, tokens, strict=True):
            text = quote(str(token), safe="@")
            if kind == "path":
                segments[at] = text
            else:
                parts[at] = parts[at].partition("=")[0] + "=" + text
        return "/".join(segments) + (sep + "&".join(parts) if sep else ""), labels
