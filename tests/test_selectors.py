"""Field selectors: every supported syntax, the labels bound as AAD, and parse errors."""

from __future__ import annotations

from typing import Any

import pytest

from sidecrypt.selectors import SelectorError, compile_selector, label

DOC: dict[str, Any] = {
    "ssn": "123",
    "card": {"number": "4111", "exp": "12/30"},
    "a b": {"it's": 1},
    "contacts": [{"phone": "p0", "name": "n0"}, {"phone": "p1"}, {"name": "n2"}],
    "tags": ["x", "y"],
    "deep": {"list": [{"name": "d0"}, [{"name": "d1"}]], "name": "d"},
}


def paths(selector: str, doc: Any = DOC) -> list[tuple[str | int, ...]]:
    return [path for _, _, path in compile_selector(selector).slots(doc)]


def values(selector: str, doc: Any = DOC) -> list[Any]:
    return [container[key] for container, key, _ in compile_selector(selector).slots(doc)]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("$.ssn", ["123"]),
        ("$.card.number", ["4111"]),
        ("$['card']['number']", ["4111"]),
        ('$["card"].number', ["4111"]),
        ("$['a b']['it\\'s']", [1]),
        ("$.contacts[*].phone", ["p0", "p1"]),
        ("$.contacts[0].phone", ["p0"]),
        ("$.contacts[-1].name", ["n2"]),
        ("$.contacts[5].name", []),
        ("$.tags[*]", ["x", "y"]),
        ("$.card.*", ["4111", "12/30"]),
        ("$.tags.*", ["x", "y"]),
        ("$.ssn.*", []),
        ("$.ssn.x", []),
        ("$.tags[0].x", []),
        ("$.card[0]", []),
        ("$.missing", []),
        ("$..phone", ["p0", "p1"]),
        ("$..name", ["n0", "n2", "d", "d0", "d1"]),
        ("$.deep..name", ["d", "d0", "d1"]),
        ("$..list[1][0].name", ["d1"]),
    ],
)
def test_selects(selector: str, expected: list[Any]) -> None:
    assert values(selector) == expected


def test_slots_are_writable_in_place() -> None:
    doc = {"contacts": [{"phone": "a"}, {"phone": "b"}]}
    for container, key, _ in compile_selector("$.contacts[*].phone").slots(doc):
        container[key] = container[key].upper()
    assert doc == {"contacts": [{"phone": "A"}, {"phone": "B"}]}


def test_negative_index_gives_concrete_path() -> None:
    assert paths("$.contacts[-1].name") == [("contacts", 2, "name")]


def test_descend_finds_nested_matches_of_the_same_name() -> None:
    assert paths("$..a", {"a": {"a": 1}}) == [("a",), ("a", "a")]


def test_top_level_array_and_scalars() -> None:
    assert values("$[*].x", [{"x": 1}, {"y": 2}, 3]) == [1]
    assert values("$[1]", [7, 8]) == [8]
    assert values("$.x", "just a string") == []
    assert values("$..x", None) == []


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (("a", "b"), "$.a.b"),
        (("a", 3, "b"), "$.a[*].b"),
        (("a b",), "$['a b']"),
        (("it's",), "$['it\\'s']"),
        (("back\\slash",), "$['back\\\\slash']"),
        (("x-y_z",), "$.x-y_z"),
        (("0abc",), "$['0abc']"),
        (("名前",), "$['名前']"),
        ((0,), "$[*]"),
    ],
)
def test_label(path: tuple[str | int, ...], text: str) -> None:
    assert label(path) == text


@pytest.mark.parametrize("name", ["plain", "a b", "it's", "back\\slash", "名前", 'q"uote'])
def test_label_compiles_back_to_the_same_member(name: str) -> None:
    doc = {name: 1}
    assert paths(label((name,)), doc) == [(name,)]


def test_labels_ignore_array_index() -> None:
    labels = {label(p) for p in paths("$.contacts[*].phone")}
    assert labels == {"$.contacts[*].phone"}


def test_is_simple() -> None:
    assert compile_selector("$.a['b c'].d").is_simple
    assert not compile_selector("$.a[0]").is_simple
    assert not compile_selector("$..a").is_simple
    assert not compile_selector("$.a.*").is_simple


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("ssn", "must start with '$'"),
        ("", "must start with '$'"),
        ("$", "whole document"),
        ("$.", "member name"),
        ("$..", "after '..'"),
        ("$..*", "after '..'"),
        ("$.a[", "unexpected '['"),
        ("$.a[x]", "unexpected '['"),
        ("$.a b", "unexpected ' '"),
        ("$.0a", "member name"),
        ("$['unterminated]", "unexpected '['"),
        ("$.a[1:2]", "unexpected '['"),
        ("$.a[?(@.x)]", "unexpected '['"),
    ],
)
def test_errors_name_the_position(text: str, where: str) -> None:
    with pytest.raises(SelectorError) as info:
        compile_selector(text)
    assert str(info.value).startswith(f"selector {text!r}")
    assert where in str(info.value)
