"""The canonical form of a JSON or form key, as broad as any app's reading of it.

Apps behind sidecrypt match keys loosely: Go's encoding/json and Jackson fold case (Go with
Unicode simple folding, so long s U+017F and the Kelvin sign match ``s`` and ``k``), ASP.NET
binds case-insensitively through upper-casing (dotless i U+0131 matches ``i``), Java's
``equalsIgnoreCase`` matches U+0130 (dotted capital I) with ``i``, and some parsers trim
whitespace or drop NULs. :func:`fold_key` maps every such spelling of a name to one form, so a
key that any of them would read as a protected name is treated as that name:

1. remove C0/C1 controls (NUL included), format characters (``Cf``: zero-width, bidi marks,
   soft hyphen, BOM, tags) and the other default-ignorable code points (variation selectors,
   combining grapheme joiner, Hangul fillers);
2. NFKC (fullwidth letters, ligatures such as U+FB01, the Kelvin and Ohm signs);
3. upper-case, then Unicode full case folding (long s -> ``S`` -> ``s``, dotless i -> ``I``
   -> ``i``, sharp s -> ``ss``), NFKC again, and ``i`` + combining dot above -> ``i``;
4. remove what step 1 removes once more, and strip surrounding whitespace.

The result is only ever compared, never sent: the document keeps the client's spelling.
"""

from __future__ import annotations

import re
import unicodedata

# Cc, Cf and Default_Ignorable_Code_Point (Unicode 15.1), as ranges; tests/transform/test_fold.py
# checks the class against unicodedata for every code point.
_IGNORABLE = re.compile(
    "["
    "\x00-\x1f\x7f-\x9f"  # C0, DEL, C1
    "\u00ad\u034f\u061c\u0600-\u0605\u06dd\u070f\u0890\u0891\u08e2"
    "\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001345f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
    "]+"
)
_ASCII_CONTROL = re.compile("[\x00-\x1f\x7f]+")
_DOTTED_I = "i\u0307"


def fold_key(name: str) -> str:
    """The key as the loosest common app would read it (see the module docstring)."""
    if name.isascii():
        # ASCII: NFKC is the identity and upper-then-casefold is lower().
        if _ASCII_CONTROL.search(name):
            name = _ASCII_CONTROL.sub("", name)
        return name.lower().strip()
    text = _IGNORABLE.sub("", name)
    text = unicodedata.normalize("NFKC", text)
    text = unicodedata.normalize("NFKC", text.upper().casefold())
    if _DOTTED_I in text:
        text = text.replace(_DOTTED_I, "i")
    return _IGNORABLE.sub("", text).strip()


def is_folded(name: str) -> bool:
    """True when ``name`` is already its own fold (cheap for plain lowercase ASCII keys)."""
    return fold_key(name) == name


_CACHE: dict[str, str] = {}
_CACHE_MAX = 8192
_CACHE_KEY_MAX = 64


def cached_fold(name: str) -> str:
    """fold_key with a bounded memo: the same few keys arrive on every request.

    A plain lowercase ASCII key folds to itself and is returned as the same object. Only keys
    up to 64 characters are kept, at most 8192 of them, so a client cannot grow the memo.
    """
    folded = _CACHE.get(name)
    if folded is None:
        folded = fold_key(name)
        if folded == name:
            folded = name
        if len(name) <= _CACHE_KEY_MAX and len(_CACHE) < _CACHE_MAX:
            _CACHE[name] = folded
    return folded


_SPLIT = re.compile(r"[.\[\]]+")


def split_key(folded: str) -> tuple[str, ...]:
    """A folded key read as the member chain it spells, as Spring, qs, Rails and PHP do.

    ``a.b``, ``a[b]``, ``a['b']``, ``a[0][b]`` -> ``(a, b)``, ``(a, b)``, ``(a, b)``,
    ``(a, 0, b)`` (all strings), each part folded again (``a. b`` is ``a.b``). A key without
    ``.``, ``[`` or ``]`` is its own chain.
    """
    pieces = (cached_fold(p.strip("'\"")) for p in _SPLIT.split(folded))
    return tuple(p for p in pieces if p) or (folded,)
