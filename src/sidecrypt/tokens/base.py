"""The base of token formats: positions, value spaces, errors (no I/O, no sidecrypt config).

A format parses a value into positions: *free* positions (a character class the token draws
from) and *literal* ones (separators, the ``@`` of an email, a kept domain) copied as they are.
``keep_first`` / ``keep_last`` count free positions from each end and copy them too. The rest is
drawn from a :class:`~sidecrypt.tokens.stream.Sampler`. A candidate that breaks a format rule or
equals the value itself is discarded and the next one drawn from the same stream, so consistent
tokens stay deterministic. Messages name formats and numbers, never a value.
"""

from __future__ import annotations

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
