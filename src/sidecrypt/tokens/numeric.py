"""Numeric token formats: ``digits`` and ``card``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import DIGITS, NONZERO, Parsed, TokenFormat, TokenSpaceError

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
