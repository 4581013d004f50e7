"""Token formats: shape, length and JSON type kept for arbitrary inputs (hypothesis), format
rules (Luhn, leading zeros, kept characters), determinism of consistent tokens, and the
config-time refusal of formats whose value space is too small."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecrypt.tokens.formats import (
    TokenFormatError,
    TokenSpaceError,
    build_format,
    luhn_valid,
)
from sidecrypt.tokens.index import TokenKeys
from sidecrypt.tokens.stream import RandomSource, Sampler

KEYS = TokenKeys(b"\x01" * 32, key_name="app", version=1)
FAST = settings(max_examples=150, deadline=None)


def tokenize(fmt, value, *, seed: bytes | None = None):
    parsed = fmt.parse(value)
    sampler = KEYS.sampler(seed, 0) if seed is not None else Sampler(RandomSource())
    return fmt.render(parsed, sampler)


def digit_strings(min_size: int = 6, max_size: int = 30) -> st.SearchStrategy[str]:
    return st.text("0123456789", min_size=min_size, max_size=max_size)


@FAST
@given(digit_strings())
def test_digit_strings_stay_digit_strings(value: str) -> None:
    fmt = build_format("digits", {}, consistent=True)
    token = tokenize(fmt, value)
    assert isinstance(token, str) and re.fullmatch(r"[0-9]+", token)
    assert len(token) == len(value) and token != value


@FAST
@given(st.integers(min_value=10**5, max_value=10**30) | st.integers(-(10**30), -(10**5)))
def test_integers_stay_integers_without_leading_zero(value: int) -> None:
    fmt = build_format("digits", {"keep_last": 0}, consistent=False)
    token = tokenize(fmt, value)
    assert type(token) is int and token != value
    assert len(str(abs(token))) == len(str(abs(value)))
    assert (token < 0) == (value < 0)


@FAST
@given(digit_strings(10, 20))
def test_digits_keep_first_and_last(value: str) -> None:
    fmt = build_format(
        "digits", {"keep_first": 2, "keep_last": 2, "min_length": 10}, consistent=True
    )
    token = tokenize(fmt, value)
    assert token[:2] == value[:2] and token[-2:] == value[-2:] and len(token) == len(value)


card_digits = st.text("0123456789", min_size=16, max_size=19)


@FAST
@given(card_digits, st.sampled_from(["", " ", "-"]))
def test_card_keeps_length_separators_and_fails_luhn(digits: str, sep: str) -> None:
    value = sep.join(digits[i : i + 4] for i in range(0, len(digits), 4))
    fmt = build_format("card", {}, consistent=True)
    token = tokenize(fmt, value, seed=value.encode())
    assert len(token) == len(value)
    assert [i for i, c in enumerate(token) if not c.isdigit()] == [
        i for i, c in enumerate(value) if not c.isdigit()
    ]
    plain = token.replace(sep, "") if sep else token
    assert plain[:6] == digits[:6] and plain[-4:] == digits[-4:]
    assert not luhn_valid(plain)


def test_card_luhn_pass_when_asked() -> None:
    fmt = build_format("card", {"luhn": "pass"}, consistent=True)
    for i in range(20):
        assert luhn_valid(tokenize(fmt, f"41111111{i:08d}"))


@FAST
@given(st.from_regex(r"\A[0-9]{3}-[0-9]{2}-[0-9]{4}\Z") | st.from_regex(r"\A[0-9]{9}\Z"))
def test_ssn_keeps_its_form(value: str) -> None:
    token = tokenize(build_format("ssn", {}, consistent=True), value)
    assert len(token) == len(value) and token != value
    assert re.fullmatch(r"[0-9]{3}-[0-9]{2}-[0-9]{4}" if "-" in value else r"[0-9]{9}", token)


@FAST
@given(st.from_regex(r"\A[A-Z]{2}[0-9]{4}-[a-z]{3}x\Z"))
def test_pattern_classes_and_escapes(value: str) -> None:
    fmt = build_format("pattern", {"pattern": r"AAdddd-aaa\x"}, consistent=True)
    token = tokenize(fmt, value)
    assert re.fullmatch(r"[A-Z]{2}[0-9]{4}-[a-z]{3}x", token)


emails = st.emails().filter(lambda e: sum(c.isalnum() for c in e.split("@")[0]) >= 4)


@FAST
@given(emails, st.sampled_from(["keep", "tokenize"]))
def test_email_stays_a_valid_address(value: str, domain: str) -> None:
    fmt = build_format("email", {"domain": domain}, consistent=True)
    try:
        fmt.parse(value)
    except TokenFormatError:
        return  # hypothesis' emails are wider than the syntax this format accepts
    token = tokenize(fmt, value)
    assert len(token) == len(value) and token != value
    assert fmt.matches(token)
    dom = token.split("@")[1]
    if domain == "keep":
        assert dom == value.split("@")[1]
    else:
        assert dom.rsplit(".", 1)[1] == value.rsplit(".", 1)[1]


@FAST
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=8, max_size=40))
def test_alnum_keeps_classes(value: str) -> None:
    fmt = build_format("alnum", {}, consistent=True)
    try:
        parsed = fmt.parse(value)
        fmt.check_space(parsed, "consistent")
    except TokenSpaceError:
        return
    token = fmt.render(parsed, Sampler(RandomSource()))
    assert len(token) == len(value)
    for a, b in zip(value, token, strict=True):
        for test in (str.isdigit, str.isupper, str.islower):
            assert test(a) == test(b)
        if not a.isalnum():
            assert a == b


@FAST
@given(st.uuids())
def test_uuid_becomes_a_v4_uuid(value: uuid.UUID) -> None:
    text = str(value)
    token = tokenize(build_format("uuid", {}, consistent=True), text)
    parsed = uuid.UUID(token)
    assert parsed.version == 4 and len(token) == len(text)
    upper = tokenize(build_format("uuid", {}, consistent=True), text.upper())
    assert upper == upper.upper()


def test_consistent_tokens_are_deterministic_and_keyed() -> None:
    fmt = build_format("ssn", {}, consistent=True)
    parsed = fmt.parse("123-45-6789")
    bidx = KEYS.blind_index(b"scope", fmt.index_bytes(parsed))
    one = fmt.render(parsed, KEYS.sampler(bidx, 0))
    assert one == fmt.render(parsed, KEYS.sampler(bidx, 0))
    assert one != fmt.render(parsed, KEYS.sampler(bidx, 1))  # the next candidate differs
    other = TokenKeys(b"\x02" * 32, key_name="app", version=1)
    assert other.blind_index(b"scope", fmt.index_bytes(parsed)) != bidx
    assert KEYS.blind_index(b"other", fmt.index_bytes(parsed)) != bidx
    assert "\\x01" not in repr(KEYS) and "01010101" not in repr(KEYS)


@pytest.mark.parametrize(
    ("name", "options", "consistent", "needle"),
    [
        ("digits", {"keep_first": 2, "keep_last": 2}, True, "leaves 100 possible"),
        ("digits", {"min_length": 5}, False, "random tokens need"),
        ("card", {"keep_first": 8}, True, "leaves 10,000"),
        ("card", {"min_length": 15}, True, "raise min_length"),
        ("pattern", {"pattern": "ddd-dd"}, True, "leaves 100,000"),
        ("ssn", {"keep_last": 4}, True, "leaves 100,000"),
        ("email", {"min_length": 3}, True, "email"),
    ],
)
def test_small_value_spaces_are_refused(name, options, consistent, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        build_format(name, options, consistent=consistent)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("nope", {}, "unknown token format"),
        ("digits", {"luhn": "fail"}, "no option 'luhn'"),
        ("card", {"luhn": "maybe"}, "luhn must be"),
        ("pattern", {}, "needs a pattern"),
        ("pattern", {"pattern": "---"}, "at least one class"),
        ("email", {"domain": "drop"}, "domain must be"),
        ("digits", {"keep_first": -1}, "keep_first must be"),
    ],
)
def test_bad_format_options_are_refused(name, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_format(name, options, consistent=True)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("digits", "12a456"),
        ("digits", True),
        ("digits", 12.5),
        ("card", "4111 1111 1111"),
        ("card", "4111x1111111111111"),
        ("ssn", "123-456-789"),
        ("email", "not-an-address"),
        ("email", "a..b@example.com"),
        ("alnum", "caf\u00e9 latte"),
        ("uuid", "1234"),
    ],
)
def test_values_that_do_not_fit_are_refused_without_echo(name, value) -> None:
    fmt = build_format(name, {}, consistent=True)
    with pytest.raises(TokenFormatError) as info:
        fmt.parse(value)
    assert str(value) not in info.value.message
    assert info.value.status == 400


def test_short_values_are_refused_at_run_time() -> None:
    with pytest.raises(TokenSpaceError):
        build_format("digits", {}, consistent=True).parse("12345")
    with pytest.raises(TokenSpaceError):
        build_format("alnum", {}, consistent=True).parse("ab-12")
    email = build_format("email", {}, consistent=True)
    with pytest.raises(TokenSpaceError):
        email.parse("bob@example.com")
