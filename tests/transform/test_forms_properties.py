"""Property tests (issue 16 class 6): forms built to smuggle a canary past the name rules.

Hypothesis builds urlencoded and multipart bodies whose fields spell the protected paths as
parsers read them: each name folded as apps fold keys (case, long s, fullwidth, NUL, invisible
characters, surrounding space), joined with brackets, dots or both, ``[]`` or any index for
arrays, extra parents before the names, names percent-encoded or with ``+`` for spaces,
repeated, between decoy fields. Property: the body is refused with a 4xx, or no field of the
outgoing body (read back with the stdlib) holds the canary.
"""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qsl, quote

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecrypt.errors import RequestError
from sidecrypt.proxy.routes import compile_fields
from sidecrypt.transform.form_names import NameRules
from sidecrypt.transform.forms import rebuild_urlencoded, scan_urlencoded
from sidecrypt.transform.multipart import rebuild_multipart, scan_multipart

CANARY = "canary-form-prop-77d1"
SPECS = compile_fields(["$.ssn", "$.card.number", "$.contacts[*].phone", "$.tags[*]"])
RULES = NameRules(SPECS)
PATHS = [("ssn",), ("card", "number"), ("contacts", "*", "phone"), ("tags", "*")]
IGNORABLE = ["\x00", "\u200b", "\u2060", "\ufeff", "\u00ad"]


@st.composite
def spelling(draw: st.DrawFn, name: str) -> str:
    out = []
    for ch in name:
        how = draw(st.sampled_from(["same", "same", "upper", "fullwidth", "long-s", "ignorable"]))
        if how == "upper":
            ch = ch.upper()
        elif how == "fullwidth":
            ch = chr(ord(ch) - 0x20 + 0xFF00)
        elif how == "long-s" and ch == "s":
            ch = "\u017f"
        elif how == "ignorable":
            ch += draw(st.sampled_from(IGNORABLE))
        out.append(ch)
    pad = draw(st.sampled_from(["", "", " ", "\t"]))
    return pad + "".join(out) + pad


@st.composite
def protected_name(draw: st.DrawFn) -> str:
    path = draw(st.sampled_from(PATHS))
    parents = draw(st.lists(st.sampled_from(["x", "data", "0"]), max_size=2))
    parts = [*parents]
    for step in path:
        if step == "*":
            parts.append(draw(st.sampled_from(["", "0", "3", "21"])))
        else:
            parts.append(draw(spelling(step)))
    if path[-1] == "*" and draw(st.booleans()):
        parts.pop()  # tags=a&tags=b: a repeated plain name is the list
    style = draw(st.sampled_from(["brackets", "dots", "mixed"]))
    name = parts[0]
    for i, part in enumerate(parts[1:]):
        if style == "brackets" or (style == "mixed" and (part.isdigit() or part == "")):
            name += f"[{part}]"
        elif style == "dots" and part != "":
            name += "." + part
        elif style == "mixed" and i % 2:
            name += f"[{part}]"
        else:
            name += "." + part if part else "[]"
    return name


fields = st.lists(
    st.one_of(
        protected_name().map(lambda n: (n, CANARY)),
        st.tuples(st.sampled_from(["name", "id", "note", "card[exp]"]), st.just("decoy")),
    ),
    min_size=1,
    max_size=6,
)


def encode_name(name: str, plus: bool) -> str:
    text = quote(name, safe="[]." if not plus else "[]. ")
    return text.replace(" ", "+") if plus else text


@settings(max_examples=300, deadline=None)
@given(fields, st.booleans())
def test_urlencoded_forms_never_carry_the_canary_out(
    pairs: list[tuple[str, str]], plus: bool
) -> None:
    body = "&".join(f"{encode_name(n, plus)}={quote(v)}" for n, v in pairs).encode()
    try:
        scan = scan_urlencoded(body, RULES, SPECS)
    except RequestError as exc:
        assert 400 <= exc.status < 500 and CANARY not in exc.message
        return
    out = rebuild_urlencoded(scan.items, scan.found, ["sc1.token"] * len(scan.found))
    assert all(v != CANARY for _, v in parse_qsl(out.decode(), keep_blank_values=True))


@settings(max_examples=200, deadline=None)
@given(fields)
def test_multipart_forms_never_carry_the_canary_out(pairs: list[tuple[str, str]]) -> None:
    body = b"".join(
        b'--bnd\r\nContent-Disposition: form-data; name="'
        + n.encode()
        + b'"\r\n\r\n'
        + v.encode()
        + b"\r\n"
        for n, v in pairs
        if '"' not in n and "\r" not in n and "\n" not in n
    )
    body += b"--bnd--\r\n"
    try:
        scan = scan_multipart(body, "bnd", RULES, SPECS)
    except RequestError as exc:
        assert 400 <= exc.status < 500 and CANARY not in exc.message
        return
    out, ctype = rebuild_multipart(scan.items, scan.found, ["sc1.token"] * len(scan.found))
    assert CANARY.encode() not in out
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + out
    )
    assert len(list(msg.iter_parts())) == len(scan.items)
