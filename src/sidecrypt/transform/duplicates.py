"""Duplicate JSON keys: refuse them, because parsers disagree on which one wins.

orjson and Python's json keep the last of two equal keys, many others (Go's first-match
binders, some Java and JavaScript parsers, streaming readers) keep the first or merge both, so
``{"card": {"number": "4111"}, "card": {"x": 1}}`` would reach a first-key-wins app with the
plaintext number that sidecrypt never saw. Keys are compared after unescaping: ``"ssn"`` and
``"\\u0073sn"`` are the same key.

The check is exact and cheap. In JSON a ``:`` outside strings separates exactly one member, and
orjson never escapes ``:`` when it serialises. So without duplicates the body and the document
re-serialised have the same number of ``:`` bytes; every member the parser dropped takes at
least its own ``:`` with it. The one way a string can hide a ``:`` from that count is the escape
``\\u003a``; a body holding it gets the exact slow check (the stdlib parser with a pairs hook).
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from ..errors import RequestError

_COLON_ESCAPE = re.compile(rb"\\u003[aA]")


class DuplicateKeyError(RequestError):
    """Two members of one JSON object have the same key (after unescaping)."""

    code = "duplicate_key"


def _serialised_colons(doc: Any) -> int:
    try:
        return orjson.dumps(doc).count(b":")
    except TypeError:  # big integers, or nesting past orjson's 255: the stdlib then
        pass
    try:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).count(":")
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply", code="malformed_json") from None


def check_duplicates(body: bytes, doc: Any) -> None:
    """Raise DuplicateKeyError when ``body`` (which parsed as ``doc``) repeats a key."""
    colons = body.count(b":")
    if not colons:
        return
    if b"\\" in body and _COLON_ESCAPE.search(body):  # one byte: memchr, then the regex
        _exact(body)
    elif colons != _serialised_colons(doc):
        raise DuplicateKeyError(
            "the JSON body repeats a key in one object; send each key once", code="duplicate_key"
        )


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise DuplicateKeyError(
            "the JSON body repeats a key in one object; send each key once", code="duplicate_key"
        )
    return out


def _exact(body: bytes) -> None:
    """The slow exact check: every object's pairs, as parsed, before any are dropped."""
    try:
        json.loads(body, object_pairs_hook=_pairs)
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply", code="malformed_json") from None
    except DuplicateKeyError:
        raise
    except ValueError:  # orjson accepted it, so this should not happen: refuse, not guess
        raise RequestError("the body is not valid JSON", code="malformed_json") from None
