"""The path rule: every plausible reading of a request target, and when readings disagree.

sidecrypt routes on its own reading of a target: percent-decoded once, matched exactly, then
retried without matrix parameters, trailing slash and in lower case. The app behind it may read
the same bytes another way: decode twice, decode IIS ``%uXXXX``, overlong UTF-8 or CESU-8,
decode bytes as Latin-1, take ``+`` as a space, cut at a decoded ``?``, ``#`` or NUL, drop
whitespace and controls, fold look-alikes (NFKC, Windows best fit), ignore zero-width and other
default-ignorable code points, drop Windows' trailing dots, spaces and ``::$DATA``, drop a
``.format`` suffix, compare case-insensitively, turn ``\\`` into ``/``, collapse slashes and
resolve dot segments.

The rule, stated once: the *readings* of a target are the closure of its path under those
normalizations (:func:`readings`, bounded by :data:`LIMIT` forms and :data:`BUDGET` characters
of work). A target is ambiguous when any reading selects field rules that sidecrypt's own
reading does not select, or selects others (:func:`conflict`). The proxy refuses such a target
(400 ``ambiguous_path``), and one past the bounds too. :func:`trivial` paths have one reading
and skip it all.

Readings are compared case-folded, against route patterns folded the same way
(:func:`fold_pattern`). No HTTP and no I/O here: the router supplies the matching.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Collection, Iterable, Sequence
from urllib.parse import unquote_to_bytes

LIMIT = 256  # distinct decoded forms of one target; more is refused, never half checked
BUDGET = 128 * 1024  # characters the normalizations may produce for one target: bounds its cost

# A path needs the rule unless it is lower-case unreserved ASCII and "/" only, with no segment
# that ends in ".", no "." in its last segment and no trailing "/": no normalization changes
# such a path. One fullmatch (about 200 ns): the only cost the hot path pays.
_TRIVIAL = re.compile(r"(?:/[a-z0-9._~-]*[a-z0-9_~-])*/[a-z0-9_~-]+|/")
TRIVIAL = _TRIVIAL.fullmatch  # not None: trivial (the proxy calls it without a wrapper)
_PLAIN = re.compile(r"[A-Za-z0-9._~/-]*")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_PCT_HIGH = re.compile(r"%[89A-Fa-f][0-9A-Fa-f]")
_PCT_U = re.compile(r"%[uU]([0-9A-Fa-f]{4})")
# Overlong UTF-8 (%C0%AF is "/" to old IIS and some Java decoders): 2- and 3-byte forms.
_OVERLONG2 = re.compile(r"%([cC][01])%([89abAB][0-9A-Fa-f])")
_OVERLONG3 = re.compile(r"%[eE]0%([89][0-9A-Fa-f])%([89abAB][0-9A-Fa-f])")
_OVERLONG4 = re.compile(r"%[fF]0%(8[0-9A-Fa-f])%([89abAB][0-9A-Fa-f])%([89abAB][0-9A-Fa-f])")
# CESU-8: a UTF-16 surrogate pair as two 3-byte sequences, which some Java decoders accept.
_CESU = re.compile(r"%[eE][dD]%[abAB][0-9A-Fa-f]")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
_STREAM = re.compile(r"::\$[A-Za-z_]*$")  # an NTFS stream name: "users::$DATA" is "users"
# Default-ignorable code points (Unicode DerivedCoreProperties), which renderers and some
# normalizers drop: soft hyphen, zero-width characters, bidi controls, variation selectors, ...
_IGNORABLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)

# Combining marks (what NFKD splits off accented letters), dropped by best-fit conversions.
_COMBINING = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Windows best-fit mappings (WideCharToMultiByte) of structural look-alikes NFKC leaves alone.
_BEST_FIT = str.maketrans(
    {
        "\u2215": "/",  # DIVISION SLASH
        "\u2044": "/",  # FRACTION SLASH
        "\u2216": "\\",  # SET MINUS
        "\u00a5": "\\",  # YEN SIGN (cp932's backslash)
        "\u20a9": "\\",  # WON SIGN (cp949's backslash)
        "\u2024": ".",  # ONE DOT LEADER
        "\u00b7": ".",  # MIDDLE DOT
        "\u02d0": ":",  # MODIFIER LETTER TRIANGULAR COLON
        "\u0131": "i",  # DOTLESS I
        "\u0141": "L",  # L WITH STROKE (no decomposition)
        "\u0142": "l",
        "\u00f8": "o",  # O WITH STROKE
        "\u00d8": "O",
        "\u0111": "d",  # D WITH STROKE
        "\u0110": "D",
        "\u0127": "h",  # H WITH STROKE
    }
)

Reading = tuple[object | None, ...]


def trivial(path: str) -> bool:
    """True for a path every normalization leaves as it is."""
    return _TRIVIAL.fullmatch(path) is not None


def plain(path: str) -> bool:
    """Unreserved ASCII and "/" only: its readings differ by case and trailing dots at most."""
    return _PLAIN.fullmatch(path) is not None


def fold(text: str) -> str:
    """How pattern literals are compared: NFKC, then lower case."""
    return unicodedata.normalize("NFKC", text).lower()


def fold_pattern(pattern: str) -> str:
    """A route pattern with its literal segments folded (wildcards and ``{names}`` kept)."""
    return "/".join(seg if ("*" in seg or "{" in seg) else fold(seg) for seg in pattern.split("/"))


# -- the text normalizations (closed over by readings) -------------------------------------------


def _overlong2(m: re.Match[str]) -> str:
    return f"%{((int(m[1], 16) & 0x1F) << 6) | (int(m[2], 16) & 0x3F):02X}"


def _overlong3(m: re.Match[str]) -> str:
    return f"%{((int(m[1], 16) & 0x3F) << 6) | (int(m[2], 16) & 0x3F):02X}"


def _overlong4(m: re.Match[str]) -> str:
    code = ((int(m[1], 16) & 0x3F) << 12) | ((int(m[2], 16) & 0x3F) << 6) | (int(m[3], 16) & 0x3F)
    return f"%{code:02X}" if code < 0x80 else m[0]


def _utf8(s: str) -> str:
    """Percent-decoding as UTF-8, in one pass over the whole text (urllib's unquote splits it
    into runs); text decoded before, lone surrogates included, survives it."""
    raw = unquote_to_bytes(s.encode("utf-8", "surrogatepass"))
    return raw.decode("utf-8", "replace")


def _decodings(s: str) -> Iterable[str]:
    """Percent-decoding as UTF-8, as Latin-1, of overlong UTF-8, and IIS's %uXXXX."""
    if "%" not in s:
        return ()
    out = []
    if _PCT.search(s):
        out.append(_utf8(s))
        if _PCT_HIGH.search(s):
            if s.isascii():  # Latin-1 (Tomcat < 8, ...): bytes as characters, as sent
                out.append(unquote_to_bytes(s).decode("latin-1"))
            fixed = _OVERLONG2.sub(
                _overlong2, _OVERLONG3.sub(_overlong3, _OVERLONG4.sub(_overlong4, s))
            )
            if fixed != s:
                out.append(_utf8(fixed))
            if _CESU.search(s):
                raw = unquote_to_bytes(s.encode("utf-8", "surrogatepass"))
                try:
                    pairs = raw.decode("utf-8", "surrogatepass")
                except UnicodeDecodeError:
                    pairs = ""
                if pairs:
                    utf16 = pairs.encode("utf-16-le", "surrogatepass")
                    out.append(utf16.decode("utf-16-le", "replace"))
    if _PCT_U.search(s):
        wide = _PCT_U.sub(lambda m: chr(int(m[1], 16)), s)
        if _SURROGATE.search(wide):  # %uD835%uDC2E is one code point to UTF-16 decoders
            wide = wide.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        out.append(wide)
        out.append(_utf8(wide))  # IIS decodes both kinds in one pass
    return out


def _plus_and_delims(s: str) -> Iterable[str]:
    """ "+" as a space (form decoding applied to paths: Java's URLDecoder, PHP's urldecode), and a
    decoded "?" or "#" that a second parser takes as the end of the path."""
    out = []
    if "+" in s:
        out.append(s.replace("+", " "))
    if "?" in s or "#" in s:
        out.append(re.split("[?#]", s, maxsplit=1)[0] or "/")
    return out


def _unicode(s: str) -> Iterable[str]:
    """NFKC (fullwidth and other look-alikes), with and without default-ignorables; Windows
    "best fit" conversion to an ANSI code page (look-alike slashes and dots, letters without
    their diacritics)."""
    if s.isascii():
        return ()
    dropped = _IGNORABLE.sub("", s)
    bare = _COMBINING.sub("", unicodedata.normalize("NFKD", dropped))
    # NFKC of ``s`` itself is not needed: an ignorable left in a segment keeps it from any
    # literal, and dropping one never adds or removes a "/".
    return (dropped, unicodedata.normalize("NFKC", dropped), bare.translate(_BEST_FIT))


def _spacing(s: str) -> Iterable[str]:
    """Whitespace and controls dropped (WHATWG drops tab and newlines anywhere, Spring's
    ``trimTokens`` and others trim segments), and a cut at NUL (C servers).

    Dropping all of it stands for trimming too: pattern literals hold no whitespace, so a
    segment that keeps some inside can only meet a wildcard, which the dropped form meets as
    well (it is empty exactly when the trimmed one is).
    """
    if _SPACE_OR_CONTROL.search(s) is None:
        return ()
    return (_SPACE_OR_CONTROL.sub("", s), s.partition("\x00")[0] or "/")


_TEXT: tuple[Callable[[str], Iterable[str]], ...] = (
    _decodings,
    _plus_and_delims,
    _unicode,
    _spacing,
)


# -- the shape normalizations (applied to every text form) ---------------------------------------


def _resolve(segments: Iterable[str]) -> list[str]:
    """RFC 3986 remove_dot_segments on a segment list ("/.." at the root stays at the root)."""
    out: list[str] = []
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    return out


def _shapes(s: str) -> set[str]:
    """``s`` as routers shape it: backslashes, matrix parameters, trailing dots and spaces and
    ``::$DATA`` (Windows), then empty segments collapsed before or after dot segments are
    resolved; and without a ``.format`` suffix on the last segment (Rails ``(.:format)``,
    Spring's suffix pattern match).

    Each step runs only when its characters are there: most forms are their only shape.
    """
    if "\\" in s:
        s = s.replace("\\", "/")
    matrix = ";" in s
    stream = "::$" in s
    windows = stream or "./" in s or " /" in s or s.endswith((".", " "))
    dots = "/." in s
    head, _, last = s.rpartition("/")
    suffix = "." in last and not last.startswith(".")
    if not (matrix or windows or dots or suffix or "//" in s or (s.endswith("/") and s != "/")):
        return {s}
    out = {s}
    if suffix:
        out.add(f"{head}/{last.partition('.')[0]}")
        out.add(f"{head}/{last.rpartition('.')[0]}")
    segs = s.split("/")[1:]
    lists = [segs]
    if matrix:
        segs = [seg.partition(";")[0] for seg in segs]
        lists.append(segs)
    if windows or matrix:
        if stream:
            segs = [_STREAM.sub("", seg) for seg in segs]
        lists.append([seg if seg in (".", "..") else seg.rstrip(". ") for seg in segs])
    for segments in lists:
        out.add("/" + "/".join(_resolve(x for x in segments if x)))
        if dots or windows:  # dot segments resolved before empty segments go, too
            out.add("/" + "/".join(x for x in _resolve(segments) if x))
    return out


def _cases(s: str) -> set[str]:
    """Case-insensitive comparisons: lower, full case folding, and .NET/Java's upper-first
    (dotless i and long s compare equal to ``i`` and ``s``)."""
    return {s.lower(), s.casefold(), s.upper().lower()}


def readings(path: str, *, limit: int = LIMIT, budget: int = BUDGET) -> frozenset[str] | None:
    """Every folded form under which an app may route ``path`` (the raw, percent-encoded path
    of a target, without its query); None when the text forms are more than ``limit``, or the
    normalizations produce more than ``budget`` characters on the way (duplicates included)."""
    states = {path}
    if not plain(path):
        todo = [path]
        spent = len(path)
        while todo:
            state = todo.pop()
            for normalize in _TEXT:
                for form in normalize(state):
                    spent += len(form)
                    if spent > budget:
                        return None
                    if form not in states:
                        if len(states) >= limit:
                            return None
                        states.add(form)
                        todo.append(form)
    forms: set[str] = set()
    for state in states:
        if not state.startswith("/"):
            state = "/" + state
        for shaped in _shapes(state):
            forms |= _cases(shaped)
    return frozenset(forms)


def conflict(
    forms: Collection[str] | None,
    own: Reading,
    read: Callable[[str], Reading],
) -> bool:
    """True when some form reads differently from sidecrypt's own reading ``own``.

    A reading names, position by position, the routes whose rules apply (None: no rules).
    A form conflicts when any position names a route that ``own`` does not name there. None
    for ``forms`` (past the bound) is a conflict: never half checked.
    """
    if forms is None:
        return True
    for form in forms:
        for theirs, ours in zip(read(form), own, strict=True):
            if theirs is not None and theirs is not ours:
                return True
    return False


def first_segments(patterns: Sequence[str]) -> frozenset[str] | None:
    """The folded first literal segments of ``patterns``; None when one starts with a wildcard.

    A cheap necessary condition the router may use: a form whose first segment is none of
    these cannot match.
    """
    out = set()
    for pattern in patterns:
        seg = pattern.split("/")[1] if pattern.count("/") else ""
        if "*" in seg or "{" in seg:
            return None
        out.add(fold(seg))
    return frozenset(out)
