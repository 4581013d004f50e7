"""The shape-independent guard: a protected name anywhere in the document is protected.

Selectors are structural, apps are not: a case-insensitive binder reads ``SSN`` as ``ssn``,
Spring and qs read ``card.number`` and ``card[number]`` as ``card`` -> ``number``, and an app
may accept ``contacts`` as one object instead of an array, or a top-level array of records.
:class:`GuardPlan` is compiled from a route's encrypt selectors and applies two rules to every
member of a document, comparing keys by :func:`~sidecrypt.transform.fold.fold_key` and reading
a key that holds ``.``, ``[`` or ``]`` as the member chain it spells (``a.b``, ``a[b]``,
``a[0][b]``):

* **Structural** (the selector reaches it once keys are folded and split): the slot is
  encrypted, bound to the label the selector itself gives that place (``$.ssn`` for ``SSN``),
  so the app that stores it under its own reading returns a token the response rule opens.
* **Drift** (the selector's member names appear in order along the member's path and the path
  ends at the selector's last name, but the structure differs: nested deeper, an object where
  an array was, a top-level array): sidecrypt cannot know how the app reads it, so unless the
  value is already a token (for a container: every leaf) the request is refused with
  ``unprotected_field``, naming the path. Generic last names stay quiet: ``$.card.number``
  only reaches a ``number`` somewhere below a ``card``.

Two keys of one object that fold to the same name are refused (``ambiguous_key``). After
encryption :meth:`GuardPlan.check_outgoing` re-reads the whole outgoing document with the same
rules and stops it (500 ``plaintext_guard``) if anything protected is still not a token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..envelope import is_envelope, parse
from ..errors import CryptoError, RequestError, SidecryptError
from ..selectors import label
from .fold import cached_fold, split_key
from .guard_rules import Part, Rule, compile_rule, match

_MAX_LABEL = 200

Slot = tuple[Any, "str | int", str, int]  # container, key, label, index of the field rule


class PlaintextGuardError(SidecryptError):
    """A protected place still held plaintext after encryption: the body must not leave."""

    status = 500
    code = "plaintext_guard"


class UnprotectedFieldError(RequestError):
    """A protected name sits where no selector reaches it, holding plaintext."""

    code = "unprotected_field"


class AmbiguousKeyError(RequestError):
    """Two keys of one object fold to the same name: apps would pick either."""

    code = "ambiguous_key"


def _short(path: Sequence[Part]) -> str:
    text = label(tuple(path))
    return text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 3] + "..."


def is_token(value: Any) -> bool:
    """A string that parses as a token: ``sc1.`` before a plaintext does not pass."""
    if not is_envelope(value):
        return False
    try:
        parse(value)
    except (CryptoError, ValueError):
        return False
    return True


def all_tokens(value: Any) -> bool:
    """True when every leaf of ``value`` is a well-formed token (an empty container has none).

    Only places no selector reaches accept a client's tokens; selected places are always
    encrypted again (fields.py).
    """
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif not is_token(node):
            return False
    return True


Sealed = Callable[[Any, Any], bool]


def envelope_at(container: Any, key: Any) -> bool:
    """The default test of :meth:`GuardPlan.check_outgoing`: an sc1 token sits there."""
    return is_envelope(container[key])


class GuardPlan:
    """A route's encrypt selectors, compiled for the guard (see the module docstring)."""

    def __init__(self, fields: Sequence[Any]) -> None:
        rules: dict[str, list[Rule]] = {}
        for index, field in enumerate(fields):
            rule = compile_rule(index, field.text, field.selector, field.bind_as)
            if rule is not None:
                rules.setdefault(rule.names[-1], []).append(rule)
        self._rules = {name: tuple(found) for name, found in rules.items()}
        self._shapes: dict[tuple[Any, ...], _ObjectPlan] = {}

    def __bool__(self) -> bool:
        return bool(self._rules)

    def find_slots(self, doc: Any) -> list[Slot]:
        """Slots the selectors reach only once keys are folded or split (to encrypt).

        Raises AmbiguousKeyError or UnprotectedFieldError (see the module docstring).
        """
        out: list[Slot] = []
        for container, key, value, path, rule, canon, through, exact in self._hits(doc):
            if canon is None or through:
                if not all_tokens(value):
                    raise UnprotectedFieldError(
                        f"{_short(path)} is a protected name (selector {rule.text}) in a place "
                        "the selector does not reach; send the field where the route expects "
                        "it",
                        code="unprotected_field",
                    )
                continue
            # exact: _collect finds it under the selector's own name
            if rule.tail is None:
                if not exact:
                    out.append((container, key, rule.bind_as or label(canon), rule.index))
                continue
            slots = list(rule.tail.slots(value))
            if not slots and not all_tokens(value):
                raise UnprotectedFieldError(
                    f"{_short(path)} (selector {rule.text}) does not have the shape the "
                    "selector expects; send the field where the route expects it",
                    code="unprotected_field",
                )
            if not exact:
                for c, k, sub in slots:
                    out.append((c, k, rule.bind_as or label((*canon, *sub)), rule.index))
        return out

    def check_outgoing(self, doc: Any, sealed: Sealed = envelope_at) -> None:
        """The last check before a body leaves: raise PlaintextGuardError naming the path.

        ``sealed(container, key)`` says whether a selected place holds what the transform
        put there (an sc1 token by default; an ESDK message, a format-preserving token).
        """
        for container, key, value, path, rule, canon, through, _ in self._hits(doc):
            if canon is None or through:
                ok = all_tokens(value)
            elif rule.tail is None:
                ok = sealed(container, key)
            else:
                slots = list(rule.tail.slots(value))
                ok = all(sealed(c, k) for c, k, _ in slots) if slots else all_tokens(value)
            if not ok:
                raise PlaintextGuardError(
                    f"plaintext guard: {_short(path)} (selector {rule.text}) is not encrypted; "
                    "the body was not sent"
                )

    def _hits(self, doc: Any) -> list[_Hit]:
        """Members whose folded chain meets a rule; their values are not walked further.

        Each hit: (container, key, value, concrete path, rule, canonical path or None for
        drift, whether the rule is met inside a split key so the value is within the field,
        whether the concrete path is the canonical one). What an object's keys mean depends
        only on them and on the chain above, so it is worked out once per shape (memoised).
        """
        shapes = self._shapes
        hits: list[_Hit] = []
        if not self._rules:
            return hits
        # (node, folded chain, label parts, concrete path)
        stack: list[tuple[Any, tuple[Part, ...], tuple[Part, ...], tuple[Part, ...]]] = [
            (doc, (), (), ())
        ]
        while stack:
            node, chain, raw, path = stack.pop()
            if type(node) is list:
                for i, child in enumerate(node):
                    if isinstance(child, (dict, list)):
                        stack.append((child, (*chain, i), (*raw, i), (*path, i)))
                continue
            if type(node) is not dict:
                continue
            shape = (chain, raw, tuple(node))
            plan = shapes.get(shape)
            if plan is None:
                plan = self._object_plan(node, chain, raw, path)
                if len(shapes) >= _SHAPES_MAX:
                    shapes.clear()
                if _small(shape):
                    shapes[shape] = plan
            found, rest = plan
            for key, rule, canon, through in found:
                where = (*path, key)  # the concrete path is not part of the shape: compare here
                hits.append((node, key, node[key], where, rule, canon, through, where == canon))
            if rest and not _FLAT.issuperset(map(type, node.values())):
                for key, more, more_raw in rest:
                    child = node[key]
                    if isinstance(child, (dict, list)):
                        stack.append((child, (*chain, *more), (*raw, *more_raw), (*path, key)))
        return hits

    def _object_plan(
        self, node: dict[str, Any], chain: tuple[Part, ...], raw: tuple[Part, ...], path: Any
    ) -> _ObjectPlan:
        """Which keys of an object meet a rule, and how to walk the others."""
        rules = self._rules
        found: list[tuple[str, Rule, tuple[Part, ...] | None, bool]] = []
        rest: list[tuple[str, tuple[Part, ...], tuple[Part, ...]]] = []
        plain = True
        for key in node:
            info = _KEYS.get(key) or _key_info(key)
            plain = plain and not info[2]
            if info[3]:
                raise AmbiguousKeyError(
                    f"a key of the object at {_short(path)} holds a NUL before more text: "
                    "parsers that stop at NUL and parsers that drop it read different names",
                    code="ambiguous_key",
                )
            parts: tuple[str, ...] = info[1] or (info[0],)
            labels: tuple[Part, ...] = parts if info[1] else (key,)
            for n, part in enumerate(parts):
                if part in rules:
                    end = n + 1
                    sub, sub_raw = (*chain, *parts[:end]), (*raw, *labels[:end])
                    hit = self._match(part, sub, sub_raw)
                    if hit is not None:
                        found.append((key, *hit, end < len(parts)))
                        break
            else:
                rest.append((key, parts, labels))
        if not plain and len({cached_fold(k) for k in node}) != len(node):
            raise AmbiguousKeyError(
                f"two keys of the object at {_short(path)} differ only in case, width, "
                "invisible characters or surrounding space; send each key once",
                code="ambiguous_key",
            )
        return tuple(found), tuple(rest)

    def _match(
        self, name: str, chain: tuple[Part, ...], raw: tuple[Part, ...]
    ) -> tuple[Rule, tuple[Part, ...] | None] | None:
        """The first rule that reaches ``chain`` structurally, else the first that drifts to it."""
        return match(self._rules[name], chain, raw)


# key -> (folded, its member chain when it holds '.', '[' or ']' else None, folds differently,
#         a NUL cuts it short differently from dropping the NUL)
KeyInfo = tuple[str, "tuple[str, ...] | None", bool, bool]
_KEYS: dict[str, KeyInfo] = {}
_KEYS_MAX = 8192
_Hit = tuple[Any, Any, Any, tuple[Part, ...], Rule, "tuple[Part, ...] | None", bool, bool]
_ObjectPlan = tuple[
    tuple[tuple[str, Rule, "tuple[Part, ...] | None", bool], ...],
    tuple[tuple[str, tuple[Part, ...], tuple[Part, ...]], ...],
]
_SHAPES_MAX = 2048
_FLAT = frozenset((str, int, float, bool, type(None)))


def _small(shape: tuple[Any, ...]) -> bool:
    """Worth keeping: a few short keys under a short path (a client cannot grow the memo)."""
    _, raw, keys = shape
    if len(keys) > 64 or len(raw) > 8:
        return False
    return sum(len(p) for p in (*raw, *keys) if isinstance(p, str)) <= 2048


def _key_info(key: str) -> KeyInfo:
    folded = cached_fold(key)
    parts = split_key(folded) if ("." in folded or "[" in folded or "]" in folded) else None
    cut = "\x00" in key and cached_fold(key.partition("\x00")[0]) != folded
    info = (folded, parts, folded != key, cut)
    if len(key) <= 64 and len(_KEYS) < _KEYS_MAX:
        _KEYS[key] = info
    return info
