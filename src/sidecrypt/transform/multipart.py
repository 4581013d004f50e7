"""``multipart/form-data`` bodies on routes that encrypt request fields (RFC 7578).

A text part whose name reaches a request rule is encrypted like the JSON string it would be
(see :mod:`~sidecrypt.transform.forms`); a file part (``filename=``) with such a name is
refused, as is any part whose content an app could bind as an object (a JSON part: Spring's
``@RequestPart`` does), a nested multipart or a non-UTF-8 text part.

Framing is read strictly, because busboy, Werkzeug, PHP and Go's mime/multipart disagree on
the lenient cases; each of these is refused: a preamble or an epilogue, a delimiter not
preceded by CRLF (bare-LF framing) or followed by anything but CRLF or ``--``, a missing close
delimiter, folded or unknown part headers, a ``Content-Disposition`` that is not ``form-data``
or gives ``name`` twice, RFC 2231 ``name*``/``filename*`` parameters, backslash escapes in
quoted parameters, a ``Content-Transfer-Encoding`` other than 7bit/8bit/binary. At most
:data:`MAX_PARTS` parts. The body is re-serialised with a fresh boundary; parts that carry
nothing protected keep their headers and bytes.

Pure (no HTTP, no keys), like :mod:`~sidecrypt.transform.forms`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import RequestError
from .fold import fold_key
from .form_names import NameRules
from .forms import (
    OVERRIDE_FIELD,
    AmbiguousForm,
    Protected,
    Scan,
    UnsupportedForm,
    check_outcome,
    check_required,
    parse_media_type,
)

MAX_PARTS = 1000
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*?)[ \t]*")
_KNOWN = frozenset({b"content-disposition", b"content-type", b"content-transfer-encoding"})
_CHARSET_FIELDS = frozenset({"_charset_", "utf8"})  # HTML's and qs's charset fields
_UTF8_VALUES = frozenset({b"utf-8", "✓".encode()})
_IDENTITY = frozenset({"7bit", "8bit", "binary"})


@dataclass(slots=True)
class Part:
    head: bytes  # the header lines as sent, without the blank line
    content: bytes


def boundary_of(params: Mapping[str, str]) -> str:
    boundary = params.get("boundary")
    if boundary is None or not _BOUNDARY.fullmatch(boundary):
        raise AmbiguousForm("multipart/form-data needs one valid boundary parameter")
    return boundary


def _split(body: bytes, boundary: str) -> list[bytes]:
    delim = b"--" + boundary.encode("ascii")
    if not body.startswith(delim):
        raise AmbiguousForm("a multipart preamble, or a body that does not open with its boundary")
    pieces = body[len(delim) :].split(b"\r\n" + delim)
    if body.count(delim) != len(pieces):
        raise AmbiguousForm("a multipart boundary not at the start of a CRLF line")
    if len(pieces) > MAX_PARTS + 1:
        raise RequestError(f"more than {MAX_PARTS} parts", status=413, code="too_many_fields")
    last = pieces[-1]
    if not last.startswith(b"--") or last[2:] not in (b"", b"\r\n"):
        raise AmbiguousForm("a multipart body without its close delimiter, or with an epilogue")
    parts = pieces[:-1]
    for piece in parts:
        if not piece.startswith(b"\r\n"):
            raise AmbiguousForm("a multipart boundary followed by something other than CRLF")
    return [p[2:] for p in parts]


def _disposition(value: str) -> tuple[str, str | None]:
    """(name, filename) of a ``form-data`` disposition; refuses what parsers differ on."""
    kind, _, rest = value.partition(";")
    if kind.strip().lower() != "form-data":
        raise AmbiguousForm("a multipart part that is not form-data")
    if "\\" in rest:
        raise AmbiguousForm("a backslash in a Content-Disposition parameter")
    try:
        _, params = parse_media_type("x/x;" + rest)
    except UnsupportedForm:
        raise AmbiguousForm("a Content-Disposition that does not parse or repeats a name") from None
    if "name" not in params:
        raise AmbiguousForm("a multipart part without a name")
    return params["name"], params.get("filename")


def _headers(head: bytes) -> dict[bytes, str]:
    found: dict[bytes, str] = {}
    for line in head.split(b"\r\n"):
        m = _HEADER.fullmatch(line)
        if m is None:  # folded, bare CR or LF, or no colon
            raise AmbiguousForm("a multipart part header does not parse")
        name = m.group(1).lower()
        if name not in _KNOWN or name in found:
            raise AmbiguousForm("a multipart part header that is unknown or repeated")
        try:
            found[name] = m.group(2).decode("utf-8")
        except UnicodeDecodeError:
            raise AmbiguousForm("a multipart part header is not UTF-8") from None
    return found


def _check_type(ctype: str | None, protected: bool) -> None:
    if ctype is None:
        return
    mime, params = parse_media_type(ctype)
    if mime.startswith("multipart/"):
        raise UnsupportedForm("a nested multipart part")
    if mime in ("application/json", "text/json") or mime.endswith(("+json", "/x-json")):
        raise UnsupportedForm("a JSON part (apps bind it as an object): send the body as JSON")
    if protected and mime != "text/plain":
        raise UnsupportedForm("a protected multipart field must be text/plain")
    charset = params.get("charset")
    if mime.startswith("text/") and charset is not None and charset.lower() not in ("utf-8",):
        raise UnsupportedForm("a multipart text part in a charset other than UTF-8")


def scan_multipart(body: bytes, boundary: str, rules: NameRules, specs: Sequence[object]) -> Scan:
    """The parts as sent and the values to encrypt; refuses what parsers could disagree on."""
    parts: list[Part] = []
    found: list[Protected] = []
    overrides: list[str] = []
    for i, raw in enumerate(_split(body, boundary)):
        head, sep, content = raw.partition(b"\r\n\r\n")
        if not sep or not head:
            raise AmbiguousForm("a multipart part without headers")
        headers = _headers(head)
        cte = headers.get(b"content-transfer-encoding")
        if cte is not None and cte.strip().lower() not in _IDENTITY:
            raise UnsupportedForm("a Content-Transfer-Encoding other than 7bit, 8bit or binary")
        if b"content-disposition" not in headers:
            raise AmbiguousForm("a multipart part without Content-Disposition")
        name, filename = _disposition(headers[b"content-disposition"])
        hits = [check_outcome(rules, n) for n in {name, unquote(name)}]
        hit = next((h for h in hits if h is not None), None)
        _check_type(headers.get(b"content-type"), hit is not None)
        parts.append(Part(head, content))
        if name in _CHARSET_FIELDS and content.strip().lower() not in _UTF8_VALUES:
            raise UnsupportedForm("the form names a charset other than UTF-8")
        if fold_key(name) == OVERRIDE_FIELD:
            overrides.append(content.decode("utf-8", "replace"))
        if hit is None:
            continue
        if filename is not None:
            raise UnsupportedForm("a file part under a protected field name")
        try:
            value = content.decode("utf-8")
        except UnicodeDecodeError:
            raise AmbiguousForm("a protected multipart field is not UTF-8") from None
        found.append(Protected(i, hit[1], hit[0], value))
    check_required(specs, found)
    return Scan(parts, found, overrides)


def rebuild_multipart(
    parts: Sequence[Part], found: Sequence[Protected], tokens: Sequence[str]
) -> tuple[bytes, str]:
    """The body under a fresh boundary, and its Content-Type."""
    contents = [p.content for p in parts]
    for item, token in zip(found, tokens, strict=True):
        contents[item.index] = token.encode("ascii")
    for _ in range(8):
        boundary = "sidecrypt-" + secrets.token_hex(16)
        delim = b"--" + boundary.encode("ascii")
        if not any(delim in c or delim in p.head for c, p in zip(contents, parts, strict=True)):
            break
    else:  # pragma: no cover - 128 random bits colliding eight times
        raise AmbiguousForm("no fresh multipart boundary")
    out = bytearray()
    for part, content in zip(parts, contents, strict=True):
        out += delim + b"\r\n" + part.head + b"\r\n\r\n" + content + b"\r\n"
    out += delim + b"--\r\n"
    return bytes(out), f"multipart/form-data; boundary={boundary}"
