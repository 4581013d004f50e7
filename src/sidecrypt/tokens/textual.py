"""Text token formats: ``pattern``, ``ssn``, ``email``, ``alnum``, ``uuid``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from .base import (
    DIGITS,
    LOWER,
    LOWER_ALNUM,
    MAX_CANDIDATES,
    MIN_SPACE,
    PATTERN_CLASSES,
    UPPER,
    Parsed,
    TokenFormat,
    TokenSpaceError,
)
from .stream import Sampler


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
