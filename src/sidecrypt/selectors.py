"""JSONPath-style field selectors, compiled once at start-up.

Supported: ``$.a.b``, ``$['a b']``, ``$.a[*]``, ``$.a[0]``, ``$.a.*``, ``$..name``. That is the
subset field encryption needs; jsonpath-ng parses the full language but evaluates an order of
magnitude slower per body (see bench/), and filters or slices have no use here.

A selector yields *slots*: (container, key) pairs whose value can be read and replaced in place.
Each slot also has a *label*, the concrete path with array indices written ``[*]``, which the
envelope binds as AAD: a ciphertext cannot move to another field, but may move within an array.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_INDEX = re.compile(r"\[(-?\d+|\*)\]")
_QUOTED = re.compile(r"""\[\s*(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")\s*\]""")

# Step kinds
MEMBER, INDEX, WILD, DESCEND = "member", "index", "wild", "descend"

Slot = tuple[Any, "str | int", tuple["str | int", ...]]


class SelectorError(ValueError):
    """A selector does not parse; the message says where."""


@dataclass(frozen=True, slots=True)
class Selector:
    text: str
    steps: tuple[tuple[str, Any], ...]

    def slots(self, doc: Any) -> Iterator[Slot]:
        """Every (container, key, concrete path) the selector reaches in ``doc``."""
        yield from _walk(doc, self.steps, 0, ())

    @property
    def is_simple(self) -> bool:
        return all(kind == MEMBER for kind, _ in self.steps)


def label(path: tuple[str | int, ...]) -> str:
    """``('a', 0, 'b c')`` -> ``$.a[*]['b c']``."""
    out = ["$"]
    for part in path:
        if isinstance(part, int):
            out.append("[*]")
        elif _NAME.fullmatch(part):
            out.append("." + part)
        else:
            out.append("['" + part.replace("\\", "\\\\").replace("'", "\\'") + "']")
    return "".join(out)


def _walk(
    node: Any, steps: tuple[tuple[str, Any], ...], i: int, path: tuple[str | int, ...]
) -> Iterator[Slot]:
    kind, arg = steps[i]
    last = i == len(steps) - 1
    if kind == MEMBER:
        if isinstance(node, dict) and arg in node:
            if last:
                yield node, arg, (*path, arg)
            else:
                yield from _walk(node[arg], steps, i + 1, (*path, arg))
    elif kind == INDEX:
        if isinstance(node, list) and -len(node) <= arg < len(node):
            idx = arg % len(node)
            if last:
                yield node, idx, (*path, idx)
            else:
                yield from _walk(node[idx], steps, i + 1, (*path, idx))
    elif kind == WILD:
        items: Any = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else ()
        )
        for key, child in list(items):
            if last:
                yield node, key, (*path, key)
            else:
                yield from _walk(child, steps, i + 1, (*path, key))
    else:  # DESCEND: the member ``arg`` at this level or any level below
        yield from _descend(node, arg, steps, i, path, last)


def _descend(
    node: Any,
    name: str,
    steps: tuple[tuple[str, Any], ...],
    i: int,
    path: tuple[str | int, ...],
    last: bool,
) -> Iterator[Slot]:
    if isinstance(node, dict):
        if name in node:
            if last:
                yield node, name, (*path, name)
            else:
                yield from _walk(node[name], steps, i + 1, (*path, name))
        for key, child in list(node.items()):
            if isinstance(child, (dict, list)):
                yield from _descend(child, name, steps, i, (*path, key), last)
    elif isinstance(node, list):
        for idx, child in enumerate(node):
            if isinstance(child, (dict, list)):
                yield from _descend(child, name, steps, i, (*path, idx), last)


def compile_selector(text: str) -> Selector:
    """Parse once; raise SelectorError naming the offending position."""
    if not text.startswith("$"):
        raise SelectorError(f"selector {text!r} must start with '$'")
    steps: list[tuple[str, Any]] = []
    pos = 1
    while pos < len(text):
        rest = text[pos:]
        if rest.startswith(".."):
            m = _NAME.match(text, pos + 2)
            if not m:
                raise SelectorError(
                    f"selector {text!r}: expected a member name after '..' at {pos}"
                )
            steps.append((DESCEND, m.group()))
            pos = m.end()
        elif rest.startswith(".*"):
            steps.append((WILD, None))
            pos += 2
        elif rest.startswith("."):
            m = _NAME.match(text, pos + 1)
            if not m:
                raise SelectorError(f"selector {text!r}: expected a member name at {pos + 1}")
            steps.append((MEMBER, m.group()))
            pos = m.end()
        elif (m := _INDEX.match(text, pos)) is not None:
            steps.append((WILD, None) if m.group(1) == "*" else (INDEX, int(m.group(1))))
            pos = m.end()
        elif (m := _QUOTED.match(text, pos)) is not None:
            raw = m.group(1) if m.group(1) is not None else m.group(2)
            steps.append((MEMBER, re.sub(r"\\(.)", r"\1", raw)))
            pos = m.end()
        else:
            raise SelectorError(f"selector {text!r}: unexpected {text[pos]!r} at {pos}")
    if not steps:
        raise SelectorError(f"selector {text!r} selects the whole document; name a field")
    return Selector(text, tuple(steps))
