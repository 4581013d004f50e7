"""The path rule (transform/paths.py): every form a router may read a target as, and the verdict.

Table-driven over each normalization class (decoding once, twice, IIS %u, overlong UTF-8,
Latin-1; whitespace and controls; Windows trailing dots and spaces; NFKC look-alikes;
default-ignorables; case; matrix parameters; slashes and dot segments), with the real router,
plus a property: any target built from a protected path with random encodings and folds either
selects the protected route or is refused.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from sidecrypt import config
from sidecrypt.errors import RequestError
from sidecrypt.proxy import forward
from sidecrypt.proxy.routes import Router
from sidecrypt.transform import paths

FIELDS = {"encrypt": ["$.ssn"]}
ROUTER = Router(
    [
        config.Route.model_validate(r)
        for r in [
            {
                "match": {"methods": ["POST", "PUT"], "path": "/users/**"},
                "key": "k",
                "request": FIELDS,
            },
            {
                "match": {"methods": ["POST"], "path": "/accounts/{id}"},
                "key": "k",
                "request": FIELDS,
            },
            {"match": {"path": "/billing/**"}, "key": "k", "request": FIELDS},
            {"match": {"methods": ["GET"], "path": "/profiles/**"}, "key": "k", "response": FIELDS},
            {"match": {"path": "/public/**"}},
        ]
    ],
    default_max_body=1 << 20,
)
LABELS = {
    r.label: name
    for r, name in zip(
        ROUTER.routes, ["users", "accounts", "billing", "profiles", "public"], strict=True
    )
}


class _Target:
    def __init__(self, raw: str) -> None:
        self.raw_path = raw
        self.path = URL(raw, encoded=True).path


def verdict(raw: str, method: str = "POST") -> str:
    """What the proxy decides for ``raw``: "refused", or the name of the route whose request
    rules protect the body ("-" for none)."""
    try:
        forward.check_path(_Target(raw))  # type: ignore[arg-type]
    except RequestError:
        return "refused"
    decoded = URL(raw, encoded=True).path
    match, guard = ROUTER.lookup(method, decoded)
    if not paths.trivial(raw) and ROUTER.ambiguous(method, raw, match, guard):
        return "refused"
    body = ROUTER.reading(method, decoded)[1]
    return LABELS[body.label] if body is not None else "-"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # sidecrypt's own reading, and its canonical retry (case, trailing slash, matrix)
        ("/users/1", "users"),
        ("/USERS/1", "users"),
        ("/Users/1/", "users"),
        ("/users;jsessionid=x/1", "users"),
        ("/accounts/7", "accounts"),
        ("/ACCOUNTS/7", "accounts"),
        ("/users/caf%C3%A9", "users"),  # encoded, but every reading is the users route
        ("/users/a%20b", "users"),
        # Windows / IIS / .NET: trailing dots and spaces in a segment
        ("/users./1", "refused"),
        ("/users../1", "refused"),
        ("/users%2E/1", "refused"),
        ("/users.%20/1", "refused"),
        ("/billing.", "refused"),
        # whitespace and controls: trimmed, dropped, cut at NUL
        ("/users%20/1", "refused"),
        ("/%20users/1", "refused"),
        ("/us%09ers/1", "refused"),
        ("/users%0a/1", "refused"),
        ("/users%0D/1", "refused"),
        ("/users%00x/1", "refused"),
        ("/users%C2%A0/1", "refused"),  # NO-BREAK SPACE
        ("/users%E3%80%80/1", "refused"),  # IDEOGRAPHIC SPACE
        # double and triple encoding, with the slashes and dots it hides
        ("/%2575sers/1", "refused"),
        ("/%252575sers/1", "refused"),
        ("/public/..%252Fusers/1", "refused"),
        ("/public%252F..%252Fusers/1", "refused"),
        ("/public/%252e%252e/users/1", "refused"),
        ("/users/..%252Faccounts/1", "refused"),  # raw: users; once decoded twice: accounts
        # IIS %uXXXX and overlong UTF-8
        ("/%u0075sers/1", "refused"),
        ("/%U0055SERS/1", "refused"),
        ("/%C1%B5sers/1", "refused"),
        ("/public/..%C0%AFusers/1", "refused"),
        ("/public/%E0%80%AE%E0%80%AE/users/1", "refused"),
        # bytes read as Latin-1, then NFKC: U+00AA folds to "a"
        ("/%AAccounts/1", "refused"),
        # NFKC look-alikes: fullwidth letters, solidus, full stop, reverse solidus; math letters
        ("/%EF%BD%95sers/1", "refused"),
        ("/%EF%BC%B5SERS/1", "refused"),
        ("/public%EF%BC%8F..%EF%BC%8Fusers/1", "refused"),
        ("/public/%EF%BC%8E%EF%BC%8E/users/1", "refused"),
        ("/public%EF%BC%BC..%EF%BC%BCusers/1", "refused"),
        ("/%F0%9D%90%AEsers/1", "refused"),
        ("/%EF%BC%85%EF%BC%97%EF%BC%95sers/1", "refused"),  # fullwidth "%75"
        # case folding beyond ASCII: long s, dotless i (upper-first comparisons), Kelvin sign
        ("/u%C5%BFers/1", "refused"),
        ("/b%C4%B1lling/1", "refused"),
        ("/%E2%84%AAey/1", "-"),  # no route folds to "key"
        # zero-width and other default-ignorables
        ("/u%E2%80%8Bsers/1", "refused"),
        ("/us%C2%ADers/1", "refused"),
        ("/%EF%BB%BFusers/1", "refused"),
        ("/use%E2%80%8Drs/1", "refused"),
        ("/users%EF%B8%8F/1", "refused"),
        ("/users%F3%A0%80%81/1", "refused"),  # a tag character
        # "+" as a space, a decoded "?" or "#" read as the end of the path by a second parser
        ("/users+/1", "refused"),
        ("/+users/1", "refused"),
        ("/users%3F/1", "refused"),
        ("/users%23x/1", "refused"),
        ("/users%253F/1", "refused"),
        # Windows best fit: look-alike slashes, letters without diacritics; UTF-16 pairs
        ("/public%E2%88%95..%E2%88%95users/1", "refused"),
        ("/%C3%BCsers/1", "refused"),
        ("/u%CC%88sers/1", "refused"),  # "u" + COMBINING DIAERESIS, dropped by best fit
        ("/%uD835%uDC2Esers/1", "refused"),
        ("/files/%2B1", "-"),
        # a ".format" suffix (Rails, Spring's suffix pattern match); an NTFS stream name
        ("/billing.json", "refused"),
        ("/users.json", "refused"),
        ("/accounts/7.json", "accounts"),
        ("/files/report.pdf", "-"),
        ("/users::$DATA/1", "refused"),
        # overlong 4-byte UTF-8; CESU-8 (a surrogate pair in 3-byte sequences)
        ("/%F0%80%81%B5sers/1", "refused"),
        ("/%ED%A0%B5%ED%B0%AEsers/1", "refused"),
        # matrix parameters where Tomcat reads a dot segment
        ("/users..;/1", "refused"),
        ("/public/..;x/users/1", "refused"),  # check_path's own refusal
        # unprotected paths stay unprotected, encoded or not
        ("/files/my%20report.pdf", "-"),
        ("/public/caf%C3%A9", "-"),
        ("/public/%2575", "-"),
        ("/search/%E2%80%8B", "-"),
        ("/public/a%20b/", "-"),
        ("/Public/Caf%C3%A9%20Menu/", "-"),
        ("/profiles/1", "-"),
        ("/user/1", "-"),
        ("/usersx/1", "-"),
    ],
)
def test_verdicts(raw: str, expected: str) -> None:
    assert verdict(raw) == expected


def test_a_reading_of_a_response_route_counts_too() -> None:
    """GET on a look-alike of a path whose responses are decrypted is refused as well."""
    assert verdict("/profiles/1", "GET") == "-"
    assert verdict("/profiles./1", "GET") == "refused"
    assert verdict("/pro%EF%AC%81les/1", "GET") == "refused"  # the "fi" ligature


@pytest.mark.parametrize(
    "raw",
    ["/", "/users/1", "/a-b_c~d/e.f/1", "/v1.2/items"],
)
def test_trivial_paths_have_one_reading(raw: str) -> None:
    assert paths.trivial(raw)
    assert paths.readings(raw) == {raw}


@pytest.mark.parametrize(
    "raw",
    [
        "/Users/1",
        "/users/",
        "/users./1",
        "/users.",
        "/a%20b",
        "/a;b",
        "/caf\u00e9",
        "/a b",
        "/a.json",
    ],
)
def test_other_paths_need_the_rule(raw: str) -> None:
    assert not paths.trivial(raw)


def test_readings_include_each_normalization() -> None:
    forms = paths.readings("/A%2520b/%EF%BD%83./%u0064;x/%E2%80%8Be")
    assert forms is not None
    assert "/a b/c/d/e" in forms
    assert "/a%20b/c/d/e" in forms


def test_past_the_bound_is_a_conflict() -> None:
    assert paths.readings("/%2525252575%C3%A9%20%09x", limit=3) is None
    assert paths.conflict(None, (None,), lambda form: (None,))


def test_fold_pattern_keeps_wildcards_and_names() -> None:
    assert paths.fold_pattern("/Users/{Id}/**/*/\uff41") == "/users/{Id}/**/*/a"


# -- the property: encodings and folds never reach the protected route unnoticed ----------------

FULLWIDTH = {
    c: chr(ord(c) + 0xFEE0)
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
}
IGNORABLES = ["\u200b", "\u200d", "\u00ad", "\ufeff", "\u2060", "\ufe0f"]
ACCENTED = {
    "a": "\u00e1",
    "e": "\u00e9",
    "i": "\u00ed",
    "o": "\u00f6",
    "u": "\u00fc",
    "n": "\u00f1",
}
HOWS = 11


def _encode_char(c: str, how: int) -> str:
    """One character of a target, spelled one of the ways a router may read back as ``c``."""
    if how == 0:
        return quote(c, safe="")
    if how == 1:
        return quote(quote(c, safe=""), safe="")  # double-encoded
    if how == 2:
        return f"%u{ord(c):04X}"
    if how == 3:
        return quote(FULLWIDTH.get(c, c), safe="")
    if how == 4:
        return c.upper() if c.islower() else c.lower()
    if how == 5:
        return c + quote(IGNORABLES[ord(c) % len(IGNORABLES)], safe="")
    if how == 6 and c.isascii():  # overlong two-byte UTF-8
        code = ord(c)
        return f"%{0xC0 | (code >> 6):02X}%{0x80 | (code & 0x3F):02X}"
    if how == 7 and c.islower():  # MATHEMATICAL BOLD SMALL letter, as an IIS UTF-16 pair
        code = 0x1D41A + ord(c) - ord("a")
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        return f"%u{high:04X}%u{low:04X}"
    if how == 8 and c in ACCENTED:  # Windows best fit drops the accent
        return quote(ACCENTED[c], safe="")
    if how == 9 and c.isascii():  # overlong three-byte UTF-8
        code = ord(c)
        return f"%E0%{0x80 | (code >> 6):02X}%{0x80 | (code & 0x3F):02X}"
    if how == 10:  # double-encoded fullwidth
        return quote(quote(FULLWIDTH.get(c, c), safe=""), safe="")
    return c


@st.composite
def disguised(draw: Any) -> tuple[str, str]:
    path = draw(st.sampled_from(["/users/123", "/accounts/42", "/billing/x/y", "/users"]))
    out = []
    for c in path:
        if c == "/":
            out.append(c)
            continue
        how = draw(st.integers(min_value=-3, max_value=HOWS - 1))
        out.append(_encode_char(c, how) if how >= 0 else c)
    raw = "".join(out)
    segments = raw.split("/")
    # Segment-level disguises: a trailing dot or space, matrix parameters, a trailing slash.
    tail = draw(
        st.sampled_from(["", ".", "%20", ";v=1", "..", "%2E", "%09", "+", "%00x", "::$DATA", "%3F"])
    )
    at = draw(st.integers(min_value=1, max_value=len(segments) - 1))
    if tail in ("%00x", "%3F"):  # a cut drops what follows: only the last segment keeps the route
        at = len(segments) - 1
    segments[at] += tail
    raw = "/".join(segments) + draw(st.sampled_from(["", "/"]))
    return path, raw


@settings(max_examples=300, deadline=None)
@given(disguised())
def test_disguised_protected_paths_are_protected_or_refused(case: tuple[str, str]) -> None:
    path, raw = case
    expected = verdict(path)
    assert expected in ("users", "accounts", "billing")
    got = verdict(raw)
    assert got in ("refused", expected), (raw, unquote(raw), got)


def test_the_work_per_target_is_bounded() -> None:
    nasty = "/" + "/".join(["%25252575%C3%A9+%09%EF%BD%95%u0075." for _ in range(200)])
    assert paths.readings(nasty) is None  # refused, after bounded work, never half checked
    assert paths.readings("/%2575sers%C3%A9+%09x") is not None
    legit = "/search/" + "+".join(["caf%C3%A9"] * 200)  # 2 KB of encoded text: still checked
    assert paths.readings(legit) is not None


@st.composite
def disguised_elsewhere(draw: Any) -> str:
    """An unprotected path with a few of the same disguises: none reads as a protected one."""
    path = draw(st.sampled_from(["/files/report", "/docs/a/b", "/search/caf", "/public/x"]))
    chars = list(path)
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        at = draw(st.integers(min_value=1, max_value=len(chars) - 1))
        if chars[at] != "/" and len(chars[at]) == 1:
            chars[at] = _encode_char(chars[at], draw(st.integers(min_value=0, max_value=HOWS - 1)))
    return "".join(chars) + draw(st.sampled_from(["", "/", ".pdf", "%20", "+x"]))


@settings(max_examples=200, deadline=None)
@given(disguised_elsewhere())
def test_disguised_unprotected_paths_still_pass(raw: str) -> None:
    """Never refused because of a reading; only a target past the bound is (fail closed)."""
    got = verdict(raw)
    assert got == "-" or (got == "refused" and paths.readings(raw) is None), (raw, unquote(raw))


@pytest.mark.parametrize(
    "raw",
    [
        "/",
        "/users/1",
        "/Users/1",
        "/users/",
        "/users./1",
        "/users.",
        "/a%20b",
        "/a;b",
        "/a.json",
        "/.well-known/x",
        "/a..b/c",
        "/x/.hidden",
        "/a/b.c/d",
        "/a_b/~c",
        "/a/b/",
        "/A",
        "/é",
    ],
)
def test_the_trivial_test_is_exact(raw: str) -> None:
    """trivial() is the one regex the hot path runs: it must agree with its definition."""
    segments = raw.split("/")[1:]
    expected = (
        all(c in "abcdefghijklmnopqrstuvwxyz0123456789._~-/" for c in raw)
        and "./" not in raw
        and "." not in segments[-1]
        and (raw == "/" or not raw.endswith("/"))
    )
    assert paths.trivial(raw) == expected
    assert (paths.TRIVIAL(raw) is not None) == expected
