"""fold_key: every spelling a loose app reads as a name folds to that name, nothing else does."""

from __future__ import annotations

import sys
import unicodedata

import pytest

from sidecrypt.transform.fold import fold_key, is_folded, split_key

SPELLINGS = [
    "ssn",
    "SSN",
    "Ssn",
    "\u017fsn",  # long s: Go's simple folding matches it with s
    "\u017f\u017fn",
    "\uff33\uff33\uff2e",  # fullwidth
    "\uff53\uff53\uff4e",
    " ssn",
    "ssn ",
    "\tssn\n",
    "\u3000ssn\u00a0",
    "ssn\x00",
    "\x00ssn",
    "s\x00sn",
    "s\u200bsn",  # zero-width space
    "s\u200dsn",  # zero-width joiner
    "\ufeffssn",  # BOM
    "s\u00adsn",  # soft hyphen
    "ss\ufe0fn",  # variation selector
    "ss\u034fn",  # combining grapheme joiner
    "s\u2060sn",  # word joiner
    "ssn\U000e0041",  # tag character
    "ssn\x85",  # C1 (NEL)
    "ssn\x9f",
    "s\u202esn",  # bidi override
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_spellings_fold_to_the_name(spelling: str) -> None:
    assert fold_key(spelling) == "ssn"


@pytest.mark.parametrize(
    ("spelling", "folded"),
    [
        ("\u212a", "k"),  # Kelvin sign
        ("KEY", "key"),
        ("\u212aey", "key"),
        ("p\u0131n", "pin"),  # dotless i: ASP.NET upper-cases it to I
        ("P\u0130N", "pin"),  # dotted capital I: Java's equalsIgnoreCase matches i
        ("stra\u00dfe", "strasse"),
        ("STRASSE", "strasse"),
        ("\ufb01eld", "field"),  # ligature
        ("\u03a9hm", "\u03c9hm"),
        ("\u2126hm", "\u03c9hm"),  # Ohm sign
        ("\u03c2", "\u03c3"),  # final sigma
        ("card.number", "card.number"),
        ("Card[Number]", "card[number]"),
        ("first name", "first name"),
        ("", ""),
        ("\x00\u200b ", ""),
    ],
)
def test_folds(spelling: str, folded: str) -> None:
    assert fold_key(spelling) == folded


@pytest.mark.parametrize("other", ["sn", "ssnx", "s sn", "ss-n", "s_sn", "ssn1", "śsn"])
def test_other_names_stay_apart(other: str) -> None:
    assert fold_key(other) != "ssn"


def test_every_control_and_format_character_is_removed() -> None:
    missed = [
        hex(cp)
        for cp in range(sys.maxunicode + 1)
        if unicodedata.category(chr(cp)) in ("Cc", "Cf") and fold_key(f"a{chr(cp)}b") != "ab"
    ]
    assert missed == []


# Default_Ignorable_Code_Point outside Cc/Cf (DerivedCoreProperties.txt)
IGNORABLE_RANGES = [
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
]


def test_default_ignorables_are_removed() -> None:
    missed = [
        hex(cp)
        for lo, hi in IGNORABLE_RANGES
        for cp in range(lo, hi + 1)
        if fold_key(f"a{chr(cp)}b") != "ab"
    ]
    assert missed == []


def test_fold_is_idempotent_and_is_folded() -> None:
    for spelling in [*SPELLINGS, "P\u0130N", "stra\u00dfe", "\ufb01eld", "\u212a"]:
        once = fold_key(spelling)
        assert fold_key(once) == once
        assert is_folded(once)
    assert is_folded("ssn")
    assert not is_folded("SSN")


@pytest.mark.parametrize(
    ("key", "chain"),
    [
        ("card.number", ("card", "number")),
        ("card[number]", ("card", "number")),
        ("card['number']", ("card", "number")),
        ('card["number"]', ("card", "number")),
        ("contacts[0][phone]", ("contacts", "0", "phone")),
        ("contacts[].phone", ("contacts", "phone")),
        ("card. number ", ("card", "number")),
        ("[ssn]", ("ssn",)),
        ("ssn", ("ssn",)),
        ("..", ("..",)),
    ],
)
def test_split_key(key: str, chain: tuple[str, ...]) -> None:
    assert split_key(fold_key(key)) == chain
