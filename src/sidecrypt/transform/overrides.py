"""Method overrides carried in a request's data: a ``_method`` query field, form field or JSON key.

Rails (Rack::MethodOverride), Laravel, Symfony and express method-override read the method an
app applies from such a field. Their header forms are stripped before forwarding
(proxy/forward.py); a field cannot be dropped without rewriting the target or the body, so the
proxy refuses one that would select other field rules (proxy/app.py). These helpers find the
values, reading names as loosely as any framework might. No HTTP, no I/O.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote_plus

OVERRIDE_PARAMS = frozenset(
    {"_method", "x-http-method-override", "x-http-method", "x-method-override"}
)
# An ASCII letter or "_" escaped in JSON: encoders escape only non-ASCII and controls, so
# "\u005fmethod" is someone's choice.
_ESCAPED_ASCII = re.compile(rb"\\u00[4-7][0-9a-fA-F]")
_SEPARATORS = re.compile("[&;]")


def _name(raw: str) -> str:
    """A field name as the loosest framework reads it: decoded up to three times, trimmed,
    case-folded, a ``[]``-style suffix dropped."""
    for _ in range(3):
        decoded = unquote_plus(raw)
        if decoded == raw:
            break
        raw = decoded
    return raw.strip().lower().partition("[")[0]


def query_overrides(query: str) -> list[str]:
    """The override values in a query or urlencoded form string (split on ``&`` and ``;``)."""
    out = []
    for piece in _SEPARATORS.split(query):
        name, _, value = piece.partition("=")
        if _name(name) in OVERRIDE_PARAMS:
            out.append(unquote_plus(value))
    return out


def may_carry_override(body: bytes) -> bool:
    """Whether a JSON body may hold an override key: substring tests (a few hundred
    nanoseconds on 1 KB), the regex only when an escape is there."""
    if b"ethod" in body or b"ETHOD" in body:
        return True
    return b"\\u" in body and _ESCAPED_ASCII.search(body) is not None


def json_overrides(body: bytes) -> list[str]:
    """The override values among a JSON object's top-level keys (Laravel merges a JSON body into
    its input). A body that is not JSON holds none: the transform refuses it on its own."""
    if not may_carry_override(body):
        return []
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    return [v for k, v in doc.items() if isinstance(v, str) and _name(k) in OVERRIDE_PARAMS]
