"""Method-override fields (transform/overrides.py): found however a framework would read them."""

from __future__ import annotations

import pytest

from sidecrypt.transform import overrides


@pytest.mark.parametrize(
    ("query", "values"),
    [
        ("_method=PUT", ["PUT"]),
        ("a=1&_method=put&b=2", ["put"]),
        ("a=1;_method=PUT", ["PUT"]),
        ("%5Fmethod=PUT", ["PUT"]),
        ("%255Fmethod=PUT", ["PUT"]),
        ("_METHOD=PUT", ["PUT"]),
        ("+_method+=PUT", ["PUT"]),
        ("_method[]=PUT", ["PUT"]),
        ("_method=%50UT", ["PUT"]),
        ("X-HTTP-Method-Override=DELETE", ["DELETE"]),
        ("_method=A&_method=B", ["A", "B"]),
        ("method=PUT&payment_method=card", []),
        ("", []),
    ],
)
def test_query_overrides(query: str, values: list[str]) -> None:
    assert overrides.query_overrides(query) == values


@pytest.mark.parametrize(
    ("body", "values"),
    [
        (b'{"_method": "PUT", "ssn": "x"}', ["PUT"]),
        (b'{" _METHOD ": "PUT"}', ["PUT"]),
        (b'{"\\u005fmethod": "PUT"}', ["PUT"]),
        (b'{"_m\\u0065thod": "PUT"}', ["PUT"]),
        (b'{"payment_method": "card"}', []),
        (b'{"_method": 1}', []),
        (b'[{"_method": "PUT"}]', []),  # only an object's own keys count
        (b'{"a": "caf\\u00e9"}', []),
        (b"not json _method", []),
    ],
)
def test_json_overrides(body: bytes, values: list[str]) -> None:
    assert overrides.json_overrides(body) == values


def test_the_gate_skips_bodies_without_an_override() -> None:
    assert not overrides.may_carry_override(b'{"name": "Ada", "note": "caf\\u00e9"}')
    assert overrides.may_carry_override(b'{"x": "\\u0041"}')
