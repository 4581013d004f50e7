"""``application/x-www-form-urlencoded`` bodies on routes that encrypt request fields.

Legacy apps post forms; a field whose name reaches a request rule (see
:mod:`~sidecrypt.transform.form_names`) is encrypted like the JSON string it would be, under
the same label, so the route's JSON response rule (and offline decrypt) opens it.

The body is read the way the stdlib, qs, Rack, PHP and Go read it (``&`` separates pairs, the
first ``=`` splits a pair, ``+`` is a space, ``%XX`` escapes, UTF-8), and refused where they
could read it differently: a ``;`` (a separator to some parsers), an invalid ``%`` escape,
bytes that are not UTF-8, a body that starts like JSON (``{``, ``[``, a BOM: apps that parse
JSON whatever the type would read it as JSON), a charset other than UTF-8 (parameter,
``_charset_`` field or qs's ``utf8`` sentinel), more than :data:`MAX_FIELDS` pairs. Every
occurrence of a repeated protected name is encrypted (forms repeat names for lists). Pairs
that carry nothing protected are sent exactly as they came; a protected pair keeps its name
and gets the token.

Pure: no HTTP, no keys. :func:`scan_urlencoded` says what to encrypt, :func:`rebuild_urlencoded`
puts the tokens in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import quote, unquote_plus

from ..errors import RequestError
from .fold import fold_key
from .form_names import NameRules

MAX_FIELDS = 1000  # qs and body-parser stop at 1000 parameters
MAX_NAME = 1000
MAX_DEPTH = 32  # Rack's param_depth_limit; qs reads 5 levels. Bounds the readings' work.


def _depth(name: str) -> int:
    folded = fold_key(name) if not name.isascii() else name  # a fullwidth dot folds to "."
    return max(name.count("[") + name.count("."), folded.count("[") + folded.count("."))


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PARAM = re.compile(
    r"\s*;\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*"
    r"""([!#$%&'*+\-.^_`|~0-9A-Za-z]+|"(?:[^"\\\r\n]|\\[^\r\n])*")"""
)
_UTF8 = frozenset({"utf-8", "utf8"})


class UnsupportedForm(RequestError):
    """A body this route cannot protect in the form it was sent."""

    status = 415
    code = "unsupported_media_type"


class AmbiguousForm(RequestError):
    """Parsers could read this body differently: refused rather than guessed."""

    code = "ambiguous_form"


class UnprotectedFormField(RequestError):
    """A protected name sits where no rule's structure reaches it."""

    code = "unprotected_field"


@lru_cache(maxsize=256)
def parse_media_type(raw: str) -> tuple[str, Mapping[str, str]]:
    """``type/subtype`` (lower case) and its parameters, strictly (RFC 9110 8.3.1).

    A parameter given twice, an extended (``name*``) parameter or anything that is not a
    token or quoted string is refused: parsers differ on which one they keep. Memoised (a
    route sees a handful of distinct types), so the parameters are read-only.
    """
    text = raw.strip(" \t")
    slash = text.find("/")
    m = _TOKEN.match(text)
    m2 = _TOKEN.match(text, slash + 1) if slash > 0 else None
    if m is None or slash != m.end() or m2 is None:
        raise UnsupportedForm("the Content-Type does not parse", code="bad_content_type")
    mime = text[: m2.end()].lower()
    params: dict[str, str] = {}
    pos = m2.end()
    while pos < len(text):
        p = _PARAM.match(text, pos)
        if p is None:
            if text[pos:].strip(" \t;") == "":
                break
            raise UnsupportedForm("the Content-Type does not parse", code="bad_content_type")
        name, value = p.group(1).lower(), p.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if name in params or name.endswith("*"):
            raise UnsupportedForm(
                f"the Content-Type parameter {name!r} is repeated or extended",
                code="bad_content_type",
            )
        params[name] = value
        pos = p.end()
    return mime, MappingProxyType(params)


def check_charset(params: Mapping[str, str], what: str) -> None:
    charset = params.get("charset")
    if charset is not None and charset.lower() not in _UTF8:
        raise UnsupportedForm(f"{what} must be UTF-8 on a route that encrypts fields")


@dataclass(frozen=True, slots=True)
class Protected:
    """One value to encrypt: where it is, the label to bind, the rule that chose it."""

    index: int
    label: str
    rule: int
    value: str


class Scan(NamedTuple):
    """A form read: its pairs or parts as sent, the values to encrypt, and the values of any
    ``_method`` field (Rails, Laravel and Symfony route by it: the caller checks them)."""

    items: list[Any]
    found: list[Protected]
    overrides: list[str]


OVERRIDE_FIELD = "_method"


def check_outcome(rules: NameRules, name: str) -> tuple[int, str] | None:
    """(rule index, label) to encrypt ``name`` under, None if unprotected; refuses the rest."""
    if len(name) > MAX_NAME or _depth(name) > MAX_DEPTH:
        raise AmbiguousForm(
            f"a form field name longer than {MAX_NAME} characters or {MAX_DEPTH} levels deep"
        )
    outcome = rules.classify(name)
    if outcome is None:
        return None
    kind, rule, text = outcome
    if kind == "encrypt":
        return rule, text
    if kind == "whole":
        raise UnsupportedForm(
            f"field rule {text} encrypts a whole object or list: send this body as JSON"
        )
    raise UnprotectedFormField(
        f"a form field reads as {text} but not where the rule selects it; the body was not sent"
    )


def check_required(specs: Sequence[object], found: Sequence[Protected]) -> None:
    hit = {p.rule for p in found}
    for i, spec in enumerate(specs):
        if getattr(spec, "required", False) and i not in hit:
            text = getattr(spec, "text", "?")
            raise RequestError(
                f"required field {text} is missing from the body", code="missing_field"
            )


def _decode(raw: str) -> str:
    if _BAD_ESCAPE.search(raw):
        raise AmbiguousForm("an invalid percent escape: parsers decode it differently")
    try:
        return unquote_plus(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise AmbiguousForm("a form field is not UTF-8") from None


def scan_urlencoded(body: bytes, rules: NameRules, specs: Sequence[object]) -> Scan:
    """The body's pairs (as sent) and the values to encrypt; refuses what parsers disagree on."""
    if body.lstrip(b" \t\r\n")[:1] in (b"{", b"[", b"\xef"):
        # No form starts so (browsers encode these); apps that parse JSON whatever the type
        # (express.json({type: "*/*"}), Go's json.Decoder) would read this one as JSON.
        raise UnsupportedForm("a JSON document sent as a form: send Content-Type: application/json")
    if b";" in body:
        raise AmbiguousForm("';' separates form fields for some parsers: encode it as %3B")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousForm("the form body is not UTF-8") from None
    pairs = text.split("&")
    if len(pairs) > MAX_FIELDS:
        raise RequestError(
            f"more than {MAX_FIELDS} form fields", status=413, code="too_many_fields"
        )
    found: list[Protected] = []
    overrides: list[str] = []
    for i, pair in enumerate(pairs):
        if not pair:
            continue
        raw_name, _, raw_value = pair.partition("=")
        name = _decode(raw_name)
        value = _decode(raw_value)
        if (name == "_charset_" or name == "utf8") and value.lower() not in ("utf-8", "✓"):
            raise UnsupportedForm("the form names a charset other than UTF-8")
        if fold_key(name) == OVERRIDE_FIELD:
            overrides.append(value)
        hit = check_outcome(rules, name)
        if hit is not None:
            found.append(Protected(i, hit[1], hit[0], value))
    check_required(specs, found)
    return Scan(pairs, found, overrides)


def rebuild_urlencoded(
    pairs: Sequence[str], found: Sequence[Protected], tokens: Sequence[str]
) -> bytes:
    """The body with each protected value replaced by its token, the rest byte for byte."""
    out = list(pairs)
    for item, token in zip(found, tokens, strict=True):
        raw_name = out[item.index].partition("=")[0]
        out[item.index] = raw_name + "=" + quote(token, safe="")
    return "&".join(out).encode("utf-8")


def query_names(query: str) -> set[str]:
    """Every name a parser could read in a query string: ``&`` or ``;`` separating pairs,
    escapes decoded (as UTF-8 or Latin-1) or, when invalid, left as they are."""
    names: set[str] = set()
    for pair in re.split("[&;]", query):
        raw = pair.partition("=")[0].replace("+", " ")
        if not raw:
            continue
        names.add(raw)
        if "%" in raw:
            names.add(unquote_plus(raw, encoding="utf-8", errors="replace"))
            names.add(unquote_plus(raw, encoding="latin-1"))
    return names


def check_query(rules: NameRules, query: str) -> None:
    """A protected field must not travel in the target (frameworks merge query parameters
    into the fields they bind: PHP's $_REQUEST, Rails params, Spring, ASP.NET)."""
    for name in query_names(query):
        if len(name) > MAX_NAME or _depth(name) > MAX_DEPTH or rules.classify(name):
            raise RequestError(
                "a query parameter reads as a field this route encrypts: send it in the body",
                code="protected_field_in_query",
            )
