"""Token formats: a token has the original's JSON type, shape and length, never more.

A format parses a value into positions: *free* positions (a character class the token draws
from) and *literal* ones (separators, the ``@`` of an email, a kept domain) copied as they are.
``keep_first`` / ``keep_last`` count free positions from each end and copy them too. The rest is
drawn from a :class:`~sidecrypt.tokens.stream.Sampler`: a keyed stream for consistent tokens,
the OS CSPRNG for random ones. A candidate that breaks a format rule (a card number that passes
Luhn, an integer with a leading zero) or equals the value itself is discarded and the next one
drawn from the same stream, so consistent tokens stay deterministic.

This module has no I/O and imports nothing of sidecrypt beyond errors, so config validation
can use it. Value-space refusals name the format and the numbers, never a value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from ..errors import RequestError
from .stream import Sampler

DIGITS = "0123456789"
NONZERO = "123456789"
LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
LOWER_ALNUM = LOWER + DIGITS
UPPER_ALNUM = UPPER + DIGITS
ALNUM = UPPER + LOWER + DIGITS
HEX = "0123456789abcdef"

# The smallest number of distinct tokens a value may have, per mode (six free digits, the
# middle of a 16-digit card, just pass). Below that the keyed mapping is a small table: an app
# user who can write values learns it in a few thousand requests, and collisions (consistent)
# or a full space (random: one token per write) become frequent.
MIN_SPACE = {"consistent": 500_000, "random": 500_000}
MAX_CANDIDATES = 1000  # per attempt; rules reject ~1 in 10 (Luhn), so this is never reached

PATTERN_CLASSES = {
    "d": DIGITS,
    "a": LOWER,
    "A": UPPER,
    "x": LOWER_ALNUM,
    "X": UPPER_ALNUM,
    "*": ALNUM,
}


class TokenFormatError(RequestError):
    """A value does not fit its route's token format: refused, nothing forwarded."""

    status = 400
    code = "token_format"


class TokenSpaceError(TokenFormatError):
    code = "token_space"


@dataclass(slots=True)
class Parsed:
    """A value split into positions; ``classes[i]`` is None for a literal position."""

    value: Any
    chars: list[str]
    classes: list[str | None]
    kind: str  # "int" or "str": the JSON type the token must have
    sign: str = ""

    def free(self, keep_first: int, keep_last: int) -> list[int]:
        idx = [i for i, c in enumerate(self.classes) if c]
        return idx[keep_first : len(idx) - keep_last] if keep_first + keep_last < len(idx) else []

    def space(self, keep_first: int, keep_last: int, limit: int) -> int:
        """Distinct tokens for this value, counted up to ``limit`` (enough to compare)."""
        n = 1
        for i in self.free(keep_first, keep_last):
            n *= len(self.classes[i] or "")
            if n >= limit:
                return n
        return n


class TokenFormat:
    """Base class: subclasses parse values, render tokens and state their smallest space."""

    name: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset({"keep_first", "keep_last", "min_length"})
    default_min_length: ClassVar[int] = 6

    def __init__(self, options: Mapping[str, Any]) -> None:
        unknown = set(options) - self.options
        if unknown:
            raise ValueError(f"format {self.name} has no option {sorted(unknown)[0]!r}")
        self.keep_first = _int(options, "keep_first", self.default_keep_first())
        self.keep_last = _int(options, "keep_last", self.default_keep_last())
        self.min_length = _int(options, "min_length", self.default_min_length)
        self.opts = dict(options)

    def default_keep_first(self) -> int:
        return 0

    def default_keep_last(self) -> int:
        return 0

    @cached_property
    def signature(self) -> str:
        """Name and options in canonical form: tokens of different formats never mix."""
        parts = [self.name, f"kf={self.keep_first}", f"kl={self.keep_last}"]
        parts += [f"{k}={self.opts[k]}" for k in sorted(self.opts) if k not in _BASIC]
        return ";".join(parts)

    def parse(self, value: Any) -> Parsed:
        raise NotImplementedError

    def min_space(self) -> int:
        """Distinct tokens of the shortest value this format accepts (config-time check)."""
        raise NotImplementedError

    def accept(self, parsed: Parsed, token: str) -> bool:
        """A format rule on a whole candidate (Luhn); True by default."""
        return True

    def index_bytes(self, parsed: Parsed) -> bytes:
        """The value for the blind index: JSON type and exact text (one spelling, one token:
        a stored token is returned as it was first made, so its separators must fit)."""
        return f"{parsed.kind}:{parsed.sign}{''.join(parsed.chars)}".encode()

    def check_space(self, parsed: Parsed, mode: str) -> None:
        need = MIN_SPACE[mode]
        if parsed.space(self.keep_first, self.keep_last, need) < need:
            raise TokenSpaceError(
                f"a {self.name} value has too few free characters for a safe token "
                f"(fewer than {need:,} possible tokens)"
            )

    def render(self, parsed: Parsed, sampler: Sampler) -> Any:
        """One token for ``parsed``: same type and length, rules met, never the value itself."""
        original = "".join(parsed.chars)
        free = parsed.free(self.keep_first, self.keep_last)
        for _ in range(MAX_CANDIDATES):
            chars = list(parsed.chars)
            for i in free:
                chars[i] = sampler.choice(parsed.classes[i] or "")
            text = "".join(chars)
            if text != original and self.accept(parsed, text):
                return int(parsed.sign + text) if parsed.kind == "int" else text
        raise TokenSpaceError(f"no {self.name} token could be drawn for a value")

    def matches(self, token: Any) -> bool:
        """Whether ``token`` has this format's shape (detokenize skips values that do not)."""
        try:
            self.parse(token)
        except TokenFormatError:
            return False
        return True

    def _refuse(self, what: str) -> TokenFormatError:
        return TokenFormatError(f"the value is not a valid {self.name} ({what})")


_BASIC = frozenset({"keep_first", "keep_last", "min_length"})


def _int(options: Mapping[str, Any], name: str, default: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0")
    return value


_DIGIT_STR = re.compile(r"[0-9]+")


class DigitsFormat(TokenFormat):
    """Digits for digits: a JSON integer stays an integer (no leading zero), a digit string a
    digit string of the same length."""

    name = "digits"

    def parse(self, value: Any) -> Parsed:
        if isinstance(value, bool):
            raise self._refuse("a boolean")
        if isinstance(value, int):
            kind, sign, text = "int", "-" if value < 0 else "", str(abs(value))
        elif isinstance(value, str) and _DIGIT_STR.fullmatch(value):
            kind, sign, text = "str", "", value
        else:
            raise self._refuse("digits only")
        if len(text) < self.min_length:
            raise TokenSpaceError(
                f"a {self.name} value is shorter than min_length {self.min_length}"
            )
        classes: list[str | None] = [DIGITS] * len(text)
        if kind == "int":
            classes[0] = NONZERO
        return Parsed(value, list(text), classes, kind, sign)

    def min_space(self) -> int:
        free = self.min_length - self.keep_first - self.keep_last
        return 0 if free <= 0 else 9 * 10 ** (free - 1) if self.keep_first == 0 else 10**free


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_CARD = re.compile(r"[0-9](?:[ \-]?[0-9])*")


class CardFormat(TokenFormat):
    """A payment card number: length and separators kept, first 6 and last 4 by default, and
    (``luhn: fail``, the default) never a valid card number."""

    name = "card"
    options = TokenFormat.options | {"luhn"}
    default_min_length = 16

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.luhn = options.get("luhn", "fail")
        if self.luhn not in ("fail", "pass", "any"):
            raise ValueError("luhn must be fail, pass or any")

    def default_keep_first(self) -> int:
        return 6

    def default_keep_last(self) -> int:
        return 4

    def parse(self, value: Any) -> Parsed:
        if isinstance(value, bool):
            raise self._refuse("a boolean")
        if isinstance(value, int) and value > 0:
            text, kind = str(value), "int"
        elif isinstance(value, str) and _CARD.fullmatch(value):
            text, kind = value, "str"
        else:
            raise self._refuse("digits with optional spaces or dashes")
        classes: list[str | None] = [DIGITS if c.isdigit() else None for c in text]
        ndigits = sum(1 for c in classes if c)
        if not 12 <= ndigits <= 19:
            raise self._refuse("12 to 19 digits")
        if ndigits < self.min_length:
            raise TokenSpaceError(f"a card value is shorter than min_length {self.min_length}")
        if kind == "int" and self.keep_first == 0:
            classes[0] = NONZERO
        return Parsed(value, list(text), classes, kind)

    def accept(self, parsed: Parsed, token: str) -> bool:
        if self.luhn == "any":
            return True
        valid = luhn_valid("".join(c for c in token if c.isdigit()))
        return valid if self.luhn == "pass" else not valid

    def min_space(self) -> int:
        free = self.min_length - self.keep_first - self.keep_last
        return 0 if free <= 0 else 10**free


def compile_template(template: str) -> list[tuple[str, str | None]]:
    """``ddd-dd-dddd`` -> [(char, class)]: d a A x X * are classes, ``\\c`` a literal c."""
    out: list[tuple[str, str | None]] = []
    escaped = False
    for ch in template:
        if escaped:
            out.append((ch, None))
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in PATTERN_CLASSES:
            out.append((ch, PATTERN_CLASSES[ch]))
        else:
            out.append((ch, None))
    if escaped:
        raise ValueError("a pattern ends with a lone backslash")
    if not any(c for _, c in out):
        raise ValueError("a pattern needs at least one class character (d a A x X *)")
    return out


class PatternFormat(TokenFormat):
    """A fixed template such as ``ddd-dd-dddd`` (or a list of templates, the first that fits):
    each class position is drawn from its class, the rest copied."""

    name = "pattern"
    options = frozenset({"keep_first", "keep_last", "pattern"})
    templates_default: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        raw = options.get("pattern", self.templates_default or None)
        if raw is None:
            raise ValueError("format pattern needs a pattern, e.g. ddd-dd-dddd")
        texts = [raw] if isinstance(raw, str) else list(raw)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError("pattern must be a template string or a list of them")
        self.templates = [compile_template(t) for t in texts]

    def parse(self, value: Any) -> Parsed:
        if not isinstance(value, str):
            raise self._refuse("a string")
        for template in self.templates:
            if len(template) == len(value) and all(
                (ch in cls) if cls else ch == lit
                for ch, (lit, cls) in zip(value, template, strict=True)
            ):
                return Parsed(value, list(value), [c for _, c in template], "str")
        raise self._refuse("it does not fit the pattern")

    def min_space(self) -> int:
        spaces = []
        for template in self.templates:
            p = Parsed("", [c for c, _ in template], [c for _, c in template], "str")
            spaces.append(p.space(self.keep_first, self.keep_last, 1 << 128))
        return min(spaces)


class SsnFormat(PatternFormat):
    """A US social security number: ``ddd-dd-dddd`` or nine digits, the form kept."""

    name = "ssn"
    templates_default = ("ddd-dd-dddd", "ddddddddd")


_LOCAL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-]{1,64}")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")


class EmailFormat(TokenFormat):
    """A valid address: the local part's letters and digits become ``[a-z0-9]`` (dots and
    other symbols stay where they are); the domain is kept, or (``domain: tokenize``) its
    labels' letters are redrawn with the top-level domain kept. keep_first/keep_last count
    in the local part."""

    name = "email"
    options = TokenFormat.options | {"domain"}
    default_min_length = 4  # of the local part: 36**4 > 10**6

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.domain = options.get("domain", "keep")
        if self.domain not in ("keep", "tokenize"):
            raise ValueError("domain must be keep or tokenize")

    def parse(self, value: Any) -> Parsed:
        if not isinstance(value, str) or value.count("@") != 1:
            raise self._refuse("one @")
        local, domain = value.split("@")
        labels = domain.split(".")
        if (
            not _LOCAL.fullmatch(local)
            or local.startswith(".")
            or local.endswith(".")
            or ".." in local
            or len(labels) < 2
            or len(domain) > 253
            or not all(_LABEL.fullmatch(label) for label in labels)
        ):
            raise self._refuse("address syntax")
        chars = list(value)
        classes: list[str | None] = [LOWER_ALNUM if c.isalnum() else None for c in local]
        free_local = sum(1 for c in classes if c)
        if free_local < self.min_length:
            raise TokenSpaceError(
                f"an email's local part is shorter than min_length {self.min_length}"
            )
        classes.append(None)  # "@"
        tld_start = len(domain) - len(labels[-1])
        for i, ch in enumerate(domain):
            draw = self.domain == "tokenize" and i < tld_start and ch.isalnum()
            classes.append(LOWER if draw else None)
        return Parsed(value, chars, classes, "str")

    def _local_end(self, parsed: Parsed) -> int:
        return parsed.chars.index("@")

    def render(self, parsed: Parsed, sampler: Sampler) -> Any:
        # keep_first/keep_last apply to the local part; the domain's free letters are all drawn.
        at = self._local_end(parsed)
        local = Parsed(parsed.value, parsed.chars[:at], parsed.classes[:at], "str")
        free = local.free(self.keep_first, self.keep_last) + [
            i for i in range(at + 1, len(parsed.chars)) if parsed.classes[i]
        ]
        original = "".join(parsed.chars)
        for _ in range(MAX_CANDIDATES):
            chars = list(parsed.chars)
            for i in free:
                chars[i] = sampler.choice(parsed.classes[i] or "")
            text = "".join(chars)
            if text != original:
                return text
        raise TokenSpaceError("no email token could be drawn for a value")

    def check_space(self, parsed: Parsed, mode: str) -> None:
        at = self._local_end(parsed)
        local = Parsed(parsed.value, parsed.chars[:at], parsed.classes[:at], "str")
        need = MIN_SPACE[mode]
        space = local.space(self.keep_first, self.keep_last, need)
        for cls in parsed.classes[at + 1 :]:
            space *= len(cls or "") or 1
        if space < need:
            raise TokenSpaceError(
                f"an email's local part has too few free characters for a safe token "
                f"(fewer than {need:,} possible tokens)"
            )

    def min_space(self) -> int:
        free = self.min_length - self.keep_first - self.keep_last
        return 0 if free <= 0 else 36**free


_PRINTABLE = re.compile(r"[\x20-\x7e]+")


class AlnumFormat(TokenFormat):
    """Same length and classes per position: a digit for a digit, an upper-case letter for
    one, a lower-case for one; other printable ASCII is copied."""

    name = "alnum"

    def parse(self, value: Any) -> Parsed:
        if not isinstance(value, str) or not _PRINTABLE.fullmatch(value):
            raise self._refuse("printable ASCII")
        classes: list[str | None] = [
            DIGITS if c.isdigit() else UPPER if c.isupper() else LOWER if c.islower() else None
            for c in value
        ]
        if sum(1 for c in classes if c) < self.min_length:
            raise TokenSpaceError(f"an alnum value is shorter than min_length {self.min_length}")
        return Parsed(value, list(value), classes, "str")

    def min_space(self) -> int:
        free = self.min_length - self.keep_first - self.keep_last
        return 0 if free <= 0 else 10**free  # all digits: the smallest class


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class UuidFormat(TokenFormat):
    """A UUID becomes a random-looking version 4 UUID (122 free bits), in the value's case."""

    name = "uuid"
    options = frozenset()

    def parse(self, value: Any) -> Parsed:
        if not isinstance(value, str) or not _UUID.fullmatch(value):
            raise self._refuse("8-4-4-4-12 hex digits")
        return Parsed(value, list(value), [None] * len(value), "str")

    def check_space(self, parsed: Parsed, mode: str) -> None:
        return None  # 2**122 tokens

    def render(self, parsed: Parsed, sampler: Sampler) -> Any:
        raw = bytearray(sampler.raw(16))
        raw[6] = (raw[6] & 0x0F) | 0x40
        raw[8] = (raw[8] & 0x3F) | 0x80
        h = raw.hex()
        text = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        return text.upper() if any(c in "ABCDEF" for c in parsed.value) else text

    def min_space(self) -> int:
        return 1 << 122


FORMATS: dict[str, type[TokenFormat]] = {
    cls.name: cls
    for cls in (
        DigitsFormat,
        CardFormat,
        PatternFormat,
        SsnFormat,
        EmailFormat,
        AlnumFormat,
        UuidFormat,
    )
}


def build_format(name: str, options: Mapping[str, Any], *, consistent: bool) -> TokenFormat:
    """A format from config; ValueError (with the reason, never a value) when it is unknown,
    malformed, or its value space is too small for the mode."""
    cls = FORMATS.get(name)
    if cls is None:
        raise ValueError(f"unknown token format {name!r} (one of {', '.join(sorted(FORMATS))})")
    fmt = cls(options)
    mode = "consistent" if consistent else "random"
    need = MIN_SPACE[mode]
    space = fmt.min_space()
    if space < need:
        raise ValueError(
            f"format {name} with keep_first {fmt.keep_first} and keep_last {fmt.keep_last} "
            f"leaves {space:,} possible tokens for its shortest value; {mode} tokens need at "
            f"least {need:,} (fewer is a table an app user can learn by writing values, and "
            "collisions become common): keep fewer characters or raise min_length"
        )
    return fmt
