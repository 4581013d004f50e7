"""Which field rule a form field's name reaches, as the parsers behind sidecrypt read names.

A form has flat names; frameworks build structure from them. One name is read every way a
common parser reads it, and it is protected when *any* reading reaches a request field rule:

* literally (``ssn``, or a selector such as ``$['card.number']``);
* brackets, as qs (express ``extended``), Rails/Rack and PHP read them: ``card[number]``,
  ``contacts[0][phone]``, ``contacts[][phone]`` (``[]`` appends: any index);
* brackets and dots, as Spring's binder, ASP.NET and qs ``allowDots`` read them:
  ``card.number``, ``contacts[0].phone``;
* PHP's mangling of the top-level name (spaces and dots become ``_``): ``card.number`` is
  ``card_number`` to PHP;
* the same after folding the whole name first (a fullwidth dot folds to ``.``);
* a repeated plain name as a list: ``tags=a&tags=b`` reaches ``$.tags[*]``.

Names are compared by :func:`~sidecrypt.transform.fold.fold_key`, part by part. Latin-1
readings of non-ASCII names are added (parsers that ignore the charset).

Outcomes (:func:`classify`): ``encrypt`` with the label the JSON field of that place gets (the
selector's spelling, indices as ``[*]``, or the rule's ``bind_as``), so a token posted in a
form opens where the app later returns it as JSON; ``whole`` when a rule selects a container
the name lies inside (a form cannot carry the container as one value: refused); ``drift``
when the rule's names appear in order along the name and it ends with the rule's last name
(for ``$.tags[*]`` that is ``tags``), but no reading matches the rule's structure (the app may
bind it anyway: refused). The same rule as the JSON guard's (transform/guard.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from ..selectors import DESCEND, INDEX, MEMBER, WILD, label
from .fold import fold_key

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_HEAD = re.compile(r"[^.\[\]]*")
_STEP = re.compile(r"\.([^.\[\]]*)|\[([^\[\]]*)\]")
_SPLIT = re.compile(r"[.\[\]]+")
_fold = lru_cache(maxsize=4096)(fold_key)

Reading = tuple[str, ...]  # raw parts; "" is an empty bracket pair (append: any index)
Outcome = tuple[Literal["encrypt", "whole", "drift"], int, str]  # kind, rule index, label/text


@dataclass(frozen=True, slots=True)
class _Rule:
    index: int
    text: str
    steps: tuple[tuple[str, Any], ...]  # MEMBER and DESCEND names folded
    canon: tuple[Any, ...]  # the selector's own arguments (its spelling, for labels)
    names: tuple[str, ...]  # folded MEMBER/DESCEND names in order (the drift rule)
    named_last: bool  # the drift rule applies (the selector names a member)
    bind_as: str | None


class NameRules:
    """A route's request encrypt rules, compiled for matching form names."""

    def __init__(self, specs: Sequence[Any]) -> None:
        rules = []
        for i, spec in enumerate(specs):
            steps = tuple(
                (k, _fold(a) if k in (MEMBER, DESCEND) else a) for k, a in spec.selector.steps
            )
            names = tuple(a for k, a in steps if k in (MEMBER, DESCEND))
            rules.append(
                _Rule(
                    i,
                    spec.text,
                    steps,
                    tuple(a for _, a in spec.selector.steps),
                    names,
                    bool(names),
                    spec.bind_as,
                )
            )
        self.rules = tuple(rules)
        self.classify = lru_cache(maxsize=1024)(self._classify)

    def _classify(self, name: str) -> Outcome | None:
        readings = readings_of(name)
        whole: Outcome | None = None
        for reading in readings:
            folded = tuple(_fold(p) for p in reading)
            for rule in self.rules:
                path = _match(rule, folded, reading)
                if path is None:
                    continue
                if path[0] == "exact":
                    return ("encrypt", rule.index, rule.bind_as or label(path[1]))
                whole = whole or ("whole", rule.index, rule.text)
        if whole is not None:
            return whole
        for rule in self.rules:
            tail = rule.steps[-1][0] in (INDEX, WILD)
            if rule.named_last and any(_drifts(rule.names, r, tail) for r in _split_readings(name)):
                return ("drift", rule.index, rule.text)
        return None


def _bracket_parts(name: str) -> tuple[str, list[str], str] | None:
    """``a[b][]x`` -> ("a", ["b", ""], "x"): qs keeps what follows the last pair as one key."""
    start = name.find("[")
    if start <= 0:
        return None
    parts: list[str] = []
    pos = start
    while (m := _BRACKETS.match(name, pos)) is not None:
        parts.append(m.group(1))
        pos = m.end()
    if not parts:
        return None
    return name[:start], parts, name[pos:]


def _mixed_parts(name: str) -> tuple[str, ...] | None:
    """``a.b[0].c`` -> ("a", "b", "0", "c") as Spring and ASP.NET bind it, or None."""
    m = _HEAD.match(name)
    assert m is not None  # the pattern matches the empty string
    parts = [m.group()]
    pos = m.end()
    while pos < len(name):
        step = _STEP.match(name, pos)
        if step is None:
            return None
        parts.append(step.group(1) if step.group(1) is not None else step.group(2))
        pos = step.end()
    return tuple(parts)


@lru_cache(maxsize=4096)
def readings_of(name: str) -> tuple[Reading, ...]:
    """Every structure a common parser builds from ``name`` (see the module docstring)."""
    variants = [name]
    folded = fold_key(name)
    if folded != name:
        variants.append(folded)
    if not name.isascii():
        # Latin-1 reading; surrogates (never from a strict UTF-8 decode) are escaped.
        variants.append(name.encode("utf-8", "surrogatepass").decode("latin-1"))
    out: list[Reading] = []
    for text in variants:
        out.append((text,))
        mixed = _mixed_parts(text)
        if mixed is not None and len(mixed) > 1:
            out.append(mixed)
        split = _bracket_parts(text)
        php = text.lstrip(" ").replace(" ", "_").replace(".", "_")
        if split is not None:
            head, parts, rest = split
            out.append((head, *parts, rest) if rest else (head, *parts))
            out.append((php[: php.find("[")], *parts))
        elif php != text or "[" in php:  # PHP: spaces, dots and a lone "[" become "_"
            out.append((php.replace("[", "_", 1),))
    return tuple(dict.fromkeys(out))


def _split_readings(name: str) -> list[tuple[str, ...]]:
    """The name cut at every ``.``, ``[`` and ``]``, parts folded (the drift rule's view)."""
    out = []
    for text in (name, fold_key(name)):
        parts = tuple(_fold(p) for p in _SPLIT.split(text) if p)
        out.append(parts or (_fold(text),))
    return out


def _drifts(names: tuple[str, ...], parts: tuple[str, ...], tail: bool) -> bool:
    """The names in order along ``parts``, ending there (or, with a tail, anywhere after)."""
    if not names or not parts or (not tail and parts[-1] != names[-1]):
        return False
    it = iter(parts)
    return all(any(p == n for p in it) for n in names)


def _index(part: str) -> int | None:
    if part == "":
        return 0
    return int(part) if part.isascii() and part.isdigit() else None


_Found = tuple[str, tuple[str | int, ...]] | None


def _match(rule: _Rule, folded: tuple[str, ...], raw: Reading) -> _Found:
    """("exact", canonical path) when the rule reaches exactly this reading, ("whole", ...)
    when it selects a prefix of it, None otherwise. Memoised on (step, part): descendant
    steps stay polynomial in the name's length."""
    steps = rule.steps
    memo: dict[tuple[int, int], _Found] = {}

    def go(i: int, j: int) -> _Found:
        """The same, for steps from ``i`` on against parts from ``j`` on (a path suffix)."""
        key = (i, j)
        if key in memo:
            return memo[key]
        memo[key] = found = step(i, j)
        return found

    def then(i: int, j: int, head: tuple[str | int, ...]) -> _Found:
        found = go(i, j)
        return None if found is None else (found[0], (*head, *found[1]))

    def step(i: int, j: int) -> _Found:
        if i == len(steps):
            return ("exact", ()) if j == len(raw) else ("whole", ())
        if j == len(raw):
            # ``tags=a&tags=b`` is the list ``tags`` to most parsers: each value is an element.
            if i and all(k in (INDEX, WILD) for k, _ in steps[i:]):
                return ("exact", (0,) * (len(steps) - i))
            return None
        kind, arg = steps[i]
        part = folded[j]
        if kind == MEMBER:
            return then(i + 1, j + 1, (rule.canon[i],)) if part == arg else None
        if kind == INDEX:  # any index: qs compacts sparse arrays (a[1]=x alone is a[0])
            return None if _index(part) is None else then(i + 1, j + 1, (0,))
        if kind == WILD:
            return then(i + 1, j + 1, (raw[j] if _index(part) is None else 0,))
        assert kind == DESCEND
        best: _Found = None
        for k in range(j, len(raw)):
            if folded[k] == arg and (rest := go(i + 1, k + 1)) is not None:
                skipped = tuple(raw[m] if _index(raw[m]) is None else 0 for m in range(j, k))
                found = (rest[0], (*skipped, rule.canon[i], *rest[1]))
                if found[0] == "exact":
                    return found
                best = best or found
        return best

    return go(0, 0)
