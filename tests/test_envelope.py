"""The field ciphertext format: fixed vectors from docs/format.md, round trips, tamper checks."""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecrypt import envelope, keys
from sidecrypt.errors import CryptoError

DATA_KEY = bytes(range(32))
WRAPPED = bytes(range(0xA0, 0xA0 + 60))
AEAD = AESGCM(DATA_KEY)
DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"

VECTOR_1 = (
    "sc1.AQVsb2NhbANhcHAAAAABAQZ0ZW5hbnQABGFjbWUAPKChoqOkpaanqKmqq6ytrq-wsbKztLW2t7i5uru8vb6_wMHCw8"
    "TFxsfIycrLzM3Oz9DR0tPU1dbX2Nna28DBwsPExcbHyMnKyyJ5FVRaTKNzru7FmxDStDfIvcHLKtPcho7fNATg"
)
VECTOR_2 = (
    "sc1.AQNrbXMHYmlsbGluZwAAAAcAADygoaKjpKWmp6ipqqusra6vsLGys7S1tre4ubq7vL2-v8DBwsPExcbHyMnKy8zN"
    "zs_Q0dLT1NXW19jZ2tsAAAAAAAAAAAAAAAB1ntv8jx2vn2fDiw9sXuT8_mEiMk_yQhXbvNKh6ZEoOiICm3MH8v_n5YRMDV7Q"
    "RpJxpw0"
)


def b64(payload: bytes) -> str:
    return "sc1." + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()


def payload(token: str) -> bytes:
    body = token[4:]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


class FakeKey:
    """Stands in for keys.CachedKey: the same three attributes encrypt_value reads."""

    def __init__(self, key_version: int = 3) -> None:
        self.aead = AEAD
        self.wrapped = WRAPPED
        self.key_version = key_version


def encrypt(
    value: Any, *, context: keys.Context = (("tenant", "acme"),), label: str = "$.f"
) -> str:
    return envelope.encrypt_value(
        value,
        key=cast(keys.CachedKey, FakeKey()),
        provider="local",
        key_name="app",
        context=context,
        label=label,
    )


def roundtrip(token: str, label: str = "$.f") -> Any:
    return envelope.decrypt_value(envelope.parse(token), AEAD, label)


# -- fixed vectors ------------------------------------------------------------------------


def test_vector_1_encrypts_exactly_and_decrypts() -> None:
    header = envelope.build_header("local", "app", 1, (("tenant", "acme"),), WRAPPED)
    token = envelope.seal(
        b'"123-45-6789"', AEAD, header=header, label="$.ssn", nonce=bytes(range(0xC0, 0xCC))
    )
    assert token == VECTOR_1
    env = envelope.parse(VECTOR_1)
    assert (env.version, env.provider, env.key_name, env.key_version) == (1, "local", "app", 1)
    assert env.context == (("tenant", "acme"),)
    assert env.wrapped == WRAPPED
    assert env.nonce == bytes(range(0xC0, 0xCC))
    assert env.header == header
    assert envelope.decrypt_value(env, AEAD, "$.ssn") == "123-45-6789"


def test_vector_2_encrypts_exactly_and_decrypts() -> None:
    value = {"n": 1, "ok": True, "tags": ["a", None]}
    header = envelope.build_header("kms", "billing", 7, (), WRAPPED)
    plaintext = envelope.dumps_json(value)
    assert plaintext == b'{"n":1,"ok":true,"tags":["a",null]}'
    assert (
        envelope.seal(plaintext, AEAD, header=header, label="$.card", nonce=bytes(12)) == VECTOR_2
    )
    env = envelope.parse(VECTOR_2)
    assert (env.provider, env.key_name, env.key_version, env.context) == ("kms", "billing", 7, ())
    assert envelope.decrypt_value(env, AEAD, "$.card") == value


def test_vectors_in_format_doc_match() -> None:
    text = DOC.read_text()
    tokens = re.findall(r"^sc1\.[A-Za-z0-9_-]+$", text, flags=re.M)
    # vector 3 (branch-wrapped data key) is checked by tests/crypto/test_branch_format.py
    assert tokens[:2] == [VECTOR_1, VECTOR_2] and len(tokens) == 3


# -- round trips -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equal with types: True is not 1, 1.0 is not 1."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


@settings(max_examples=200, deadline=None)
@given(json_values, st.text(min_size=1, max_size=20))
def test_roundtrip_any_json_value(value: Any, label: str) -> None:
    token = encrypt(value, label=label)
    assert envelope.is_envelope(token)
    assert re.fullmatch(r"sc1\.[A-Za-z0-9_-]+", token)
    assert same(roundtrip(token, label), value)


def test_big_integers_stay_exact() -> None:
    value = {"big": 2**70, "neg": -(2**64), "list": [10**30]}
    assert roundtrip(encrypt(value)) == value


def test_each_token_uses_a_fresh_nonce() -> None:
    assert encrypt("same") != encrypt("same")


def test_plaintext_not_visible_in_token() -> None:
    token = encrypt("canary-plaintext-4242")
    assert b"canary" not in payload(token)


# -- tampering ------------------------------------------------------------------------------

TOKEN = encrypt({"ssn": "123-45-6789"}, label="$.ssn")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_flipping_any_payload_byte_is_rejected(data: st.DataObject) -> None:
    raw = bytearray(payload(TOKEN))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CryptoError):
        roundtrip(b64(bytes(raw)), "$.ssn")


def test_every_single_byte_flip_is_rejected() -> None:
    raw = payload(TOKEN)
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        with pytest.raises(CryptoError):
            roundtrip(b64(bytes(bad)), "$.ssn")


@given(st.text(max_size=20).filter(lambda s: s != "$.ssn"))
def test_other_label_is_rejected(label: str) -> None:
    with pytest.raises(CryptoError, match="does not authenticate"):
        roundtrip(TOKEN, label)


def _rebuild(token: str, **changes: Any) -> str:
    """The same nonce and ciphertext under a header with some fields changed."""
    env = envelope.parse(token)
    fields = {
        "provider": env.provider,
        "key_name": env.key_name,
        "key_version": env.key_version,
        "context": env.context,
        "wrapped": env.wrapped,
    } | changes
    header = envelope.build_header(**fields)
    return b64(header + env.nonce + env.ciphertext)


@pytest.mark.parametrize(
    "change",
    [
        {"context": (("tenant", "evil"),)},
        {"context": ()},
        {"context": (("region", "eu"), ("tenant", "acme"))},
        {"key_version": 4},
        {"key_name": "billing"},
        {"provider": "kms"},
    ],
)
def test_moving_to_another_context_or_key_is_rejected(change: dict[str, Any]) -> None:
    moved = _rebuild(TOKEN, **change)
    assert roundtrip(_rebuild(TOKEN), "$.ssn") == {"ssn": "123-45-6789"}  # control
    with pytest.raises(CryptoError, match="does not authenticate"):
        roundtrip(moved, "$.ssn")


def test_wrong_data_key_is_rejected() -> None:
    with pytest.raises(CryptoError):
        envelope.decrypt_value(envelope.parse(TOKEN), AESGCM(bytes(32)), "$.ssn")


# -- malformed tokens ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("sc2.AAAA", "prefix"),
        ("", "prefix"),
        ("sc1.", "truncated"),
        ("sc1.A", "base64url"),
        ("sc1.AQ==", "base64url"),
        ("sc1.AQ+/", "base64url"),
        ("sc1.AQ A", "base64url"),
        ("sc1.AR", "non-canonical"),
        (b64(b"\x02" + payload(TOKEN)[1:]), "version 2"),
        (b64(payload(TOKEN)[:20]), "truncated"),
        (b64(payload(TOKEN)[:-17]), None),  # loses the tag: too short or fails auth
        (b64(b"\x01\x00\x03app" + bytes(40)), "provider"),
        (b64(b"\x01\x05LOCAL\x03app" + bytes(40)), "provider"),
        (b64(b"\x01\x05local\x00" + bytes(40)), "empty key name"),
        (b64(b"\x01\x05local\x02\xff\xfe\x00\x00\x00\x01\x00\x00\x01x" + bytes(40)), "UTF-8"),
        (b64(b"\x01\x05local\x03app\x00\x00\x00\x01\x00\x00\x00" + bytes(40)), "wrapped"),
        (b64(b"\x01\x05local\x03app\x00\x00\x00\x01\x00\x10\x01" + bytes(4200)), "wrapped"),
        (b64(b"\x01\x05local\x03app\x00\x00\x00\x01\x01\x00" + bytes(40)), "context"),
        (
            b64(
                b"\x01\x05local\x03app\x00\x00\x00\x01\x02\x01b\x00\x00\x01a\x00\x00\x00\x01x"
                + bytes(28)
            ),
            "canonical order",
        ),
        (b64(b"\x01\x05local\x03app\x00\x00\x00\x01\x00\x00\x01x" + bytes(27)), "truncated"),
    ],
)
def test_malformed_tokens_are_rejected(token: str, reason: str | None) -> None:
    with pytest.raises(CryptoError) as info:
        roundtrip(token)
    if reason:
        assert reason in str(info.value)


def test_extra_trailing_bytes_fail_authentication() -> None:
    with pytest.raises(CryptoError, match="does not authenticate"):
        roundtrip(b64(payload(TOKEN) + b"\x00"), "$.ssn")


def test_errors_never_contain_the_value() -> None:
    token = encrypt("canary-secret", label="$.x")
    try:
        roundtrip(token, "$.y")
    except CryptoError as exc:
        assert "canary" not in str(exc)
    else:
        raise AssertionError("expected CryptoError")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"provider": ""},
        {"provider": "x" * 33},
        {"provider": "Local"},
        {"key_name": ""},
        {"key_name": "k" * 256},
        {"key_version": 2**32},
        {"wrapped": b""},
        {"wrapped": bytes(4097)},
        {"context": (("", "v"),)},
        {"context": (("a", "v" * 65536),)},
        {"context": (("a", "1"), ("a", "2"))},
    ],
)
def test_build_header_rejects_out_of_range(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "provider": "local",
        "key_name": "app",
        "key_version": 1,
        "context": (),
        "wrapped": WRAPPED,
    } | kwargs
    with pytest.raises(CryptoError):
        envelope.build_header(**args)


def test_is_envelope() -> None:
    assert envelope.is_envelope(VECTOR_1)
    assert not envelope.is_envelope("123-45-6789")
    assert not envelope.is_envelope(None)
    assert not envelope.is_envelope(["sc1.x"])


def test_envelope_repr_has_no_key_material() -> None:
    assert DATA_KEY.hex() not in repr(envelope.parse(VECTOR_1))


def test_parse_memo_never_confuses_headers() -> None:
    """parse() reuses the last header it decoded; tokens under other headers still parse as
    themselves, and a known header followed by too few bytes is still truncated."""
    acme = encrypt("a", context=(("tenant", "acme"),))
    other = encrypt("b", context=(("tenant", "acmf"),))
    longer = encrypt("c", context=(("tenant", "acme-2"),))
    for _ in range(2):
        for token, tenant, value in (
            (acme, "acme", "a"),
            (other, "acmf", "b"),
            (acme, "acme", "a"),
        ):
            env = envelope.parse(token)
            assert env.context == (("tenant", tenant),)
            assert envelope.decrypt_value(env, AEAD, "$.f") == value
        assert envelope.parse(longer).context == (("tenant", "acme-2"),)
    header = envelope.parse(acme).header
    with pytest.raises(CryptoError, match="truncated"):
        envelope.parse(b64(header + bytes(27)))
    with pytest.raises(CryptoError, match="truncated"):
        envelope.parse(b64(header[:-1]))


def test_label_longer_than_64_kib_is_refused_both_ways() -> None:
    long_label = "$." + "x" * envelope.MAX_LABEL_BYTES
    cached = envelope._short_label_aad.cache_info().currsize
    with pytest.raises(CryptoError, match="longer than 64 KiB"):
        encrypt("v", label=long_label)
    with pytest.raises(CryptoError, match="longer than 64 KiB"):
        roundtrip(TOKEN, long_label)
    assert envelope._short_label_aad.cache_info().currsize == cached  # nothing kept


def test_labels_beyond_the_remembered_ones_still_bind() -> None:
    """The AAD form of a label is remembered for short labels, up to a bound; every label binds
    the same way whether remembered or not."""
    envelope._short_label_aad.cache_clear()
    long_label = "$." + "é" * 64  # past the length that is remembered
    limit = envelope._short_label_aad.cache_info().maxsize
    assert limit is not None
    labels = [f"$.items[{i}]" for i in range(limit + 10)] + [long_label]
    for label in labels:
        token = encrypt({"n": 1}, label=label)
        assert roundtrip(token, label) == {"n": 1}
        with pytest.raises(CryptoError, match="does not authenticate"):
            roundtrip(token, label + "x")
    assert envelope._short_label_aad.cache_info().currsize <= limit
    # Remembered or not, the form is exactly the format's: u16 length, then the UTF-8 bytes.
    for label in labels:
        raw = label.encode()
        assert envelope._label_aad(label) == len(raw).to_bytes(2, "big") + raw


def test_a_token_cut_inside_its_header_does_not_spoil_the_next_ones() -> None:
    """A header whose wrapped key runs past the end is refused, and never remembered as the
    last header: tokens under the full header still parse and decrypt afterwards."""
    token = encrypt("a", context=(("tenant", "acme"),))
    header = envelope.parse(token).header
    for cut in (1, 2, 30):
        with pytest.raises(CryptoError, match="truncated"):
            envelope.parse(b64(header[:-cut]))
        assert roundtrip(token) == "a"
        assert envelope.parse(token).header == header
