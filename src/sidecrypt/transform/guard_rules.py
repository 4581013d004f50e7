"""The guard's view of a selector, and the two ways a member's path can meet it.

A selector becomes a :class:`Rule`: its steps up to the last named one (names folded, a name
holding ``.`` or ``[`` read as its chain), the names in order, and the trailing ``[*]``,
``[n]`` or ``.*`` steps. A member's folded path meets a rule *structurally* when the steps
reach exactly that path, or by *drift* when the names appear in order along it, the last at
its end (see guard.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..selectors import DESCEND, INDEX, MEMBER, WILD, Selector
from .fold import cached_fold, split_key

Part = str | int


@dataclass(frozen=True, slots=True)
class Rule:
    """One encrypt selector, compiled for the guard."""

    index: int  # the field's position in the route's list
    text: str
    head: tuple[tuple[str, Any], ...]  # steps up to the last named one, names folded
    names: tuple[str, ...]  # the folded names of ``head``, in order
    canon: tuple[str, ...]  # the same names as the selector spells them (for labels)
    tail: Selector | None  # trailing [*] / [n] / .* steps, applied to the member's value
    bind_as: str | None


def _structural(
    head: tuple[tuple[str, Any], ...],
    canon: tuple[str, ...],
    chain: tuple[Part, ...],
    raw: tuple[Part, ...],
) -> tuple[Part, ...] | None:
    """The canonical path when ``head`` reaches exactly ``chain`` (folded), else None.

    Named steps take the selector's spelling; the others keep ``raw``, the client's.
    """

    def go(i: int, n: int, j: int) -> tuple[Part, ...] | None:
        if i == len(head):
            return () if j == len(chain) else None
        if j >= len(chain):
            return None
        kind, arg = head[i]
        part = chain[j]
        if kind == MEMBER:
            rest = go(i + 1, n + 1, j + 1) if part == arg else None
            return None if rest is None else (canon[n], *rest)
        if kind in (WILD, INDEX):
            number = part if isinstance(part, int) else int(part) if part.isdigit() else None
            if kind == INDEX and number is not None and arg >= 0 and number != arg:
                return None
            rest = go(i + 1, n, j + 1)
            return None if rest is None else (raw[j] if number is None else number, *rest)
        for k in range(j, len(chain)):  # DESCEND: any run of members, then the name
            if chain[k] == arg and (rest := go(i + 1, n + 1, k + 1)) is not None:
                return (*raw[j:k], canon[n], *rest)
        return None

    return go(0, 0, 0)


def _drifted(names: tuple[str, ...], chain: tuple[Part, ...]) -> bool:
    """The names in order along ``chain``, the last one at its end."""
    if chain[-1] != names[-1]:
        return False
    it = iter(chain[:-1])
    return all(name in it for name in names[:-1])


def match(
    rules: tuple[Rule, ...], chain: tuple[Part, ...], raw: tuple[Part, ...]
) -> tuple[Rule, tuple[Part, ...] | None] | None:
    """The first rule that reaches ``chain`` structurally, else the first that drifts to it."""
    drift = None
    for rule in rules:
        canon = _structural(rule.head, rule.canon, chain, raw)
        if canon is not None:
            return rule, canon
        if drift is None and _drifted(rule.names, chain):
            drift = rule
    return None if drift is None else (drift, None)


def compile_rule(index: int, text: str, selector: Selector, bind_as: str | None) -> Rule | None:
    steps = selector.steps
    last = max((i for i, (kind, _) in enumerate(steps) if kind in (MEMBER, DESCEND)), default=-1)
    if last < 0:
        return None  # ``$.*``, ``$[0]``: no name to look for
    head: list[tuple[str, Any]] = []
    names: list[str] = []
    canon: list[str] = []
    for kind, arg in steps[: last + 1]:
        if kind in (MEMBER, DESCEND):
            # A selector name that itself holds '.' or '[' is read as its chain, like a key.
            pieces = split_key(cached_fold(arg))
            whole = len(pieces) == 1
            for j, piece in enumerate(pieces):
                head.append((kind if j == 0 else MEMBER, piece))
                names.append(piece)
                canon.append(arg if whole else piece)
        else:
            head.append((kind, arg))
    tail = Selector(text, steps[last + 1 :]) if last + 1 < len(steps) else None
    return Rule(index, text, tuple(head), tuple(names), tuple(canon), tail, bind_as)
