"""Token formats: a token has the original's JSON type, shape and length, never more.

The formats live in ``base`` (positions, value spaces, errors), ``numeric`` (digits, card) and
``textual`` (pattern, ssn, email, alnum, uuid); this module names them and builds one from
config, refusing a value space too small for the mode. No I/O and nothing of sidecrypt beyond
errors, so config validation can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import MIN_SPACE, Parsed, TokenFormat, TokenFormatError, TokenSpaceError
from .numeric import CardFormat, DigitsFormat, luhn_valid
from .textual import (
    AlnumFormat,
    EmailFormat,
    PatternFormat,
    SsnFormat,
    UuidFormat,
    compile_template,
)

__all__ = [
    "FORMATS",
    "MIN_SPACE",
    "AlnumFormat",
    "CardFormat",
    "DigitsFormat",
    "EmailFormat",
    "Parsed",
    "PatternFormat",
    "SsnFormat",
    "TokenFormat",
    "TokenFormatError",
    "TokenSpaceError",
    "UuidFormat",
    "build_format",
    "compile_template",
    "luhn_valid",
]

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
