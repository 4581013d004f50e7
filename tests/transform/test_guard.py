"""The shape-independent guard (issue 16 classes 3 and 5) through FieldCrypto.encrypt_body.

Folded and dotted/bracket keys at a selector's place are encrypted under the selector's label;
two keys of one object that fold alike are refused; a protected name elsewhere holding
plaintext is refused naming the path, never the value; generic last names stay quiet.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.proxy.test_fields import WrapProvider, make_route

from sidecrypt import envelope
from sidecrypt.errors import RequestError
from sidecrypt.keys import DataKeyService
from sidecrypt.proxy.fields import FieldCrypto
from sidecrypt.proxy.routes import compile_fields
from sidecrypt.transform.guard import GuardPlan, PlaintextGuardError, all_tokens

CANARY = "canary-guard-5e1d"
FIELDS = ["$.ssn", "$.card.number", "$.contacts[*].phone", "$.tags[*]"]
HEADER = envelope.build_header("test", "app", 1, (), b"w" * 40)
TOKEN = envelope.seal(b'"x"', AESGCM(AESGCM.generate_key(bit_length=256)), header=HEADER, label="$")


@pytest.fixture
def crypto() -> FieldCrypto:
    return FieldCrypto(DataKeyService({"app": WrapProvider("app")}))


async def seal(crypto: FieldCrypto, doc: Any, fields: list[Any] = FIELDS) -> tuple[Any, list[str]]:
    route = make_route(fields)
    out, labels = await crypto.encrypt_body(orjson.dumps(doc), route, route.request_encrypt, ())
    assert CANARY.encode() not in out
    return orjson.loads(out), labels


async def refused(crypto: FieldCrypto, doc: Any, fields: list[Any] = FIELDS) -> RequestError:
    route = make_route(fields)
    with pytest.raises(RequestError) as info:
        await crypto.encrypt_body(orjson.dumps(doc), route, route.request_encrypt, ())
    assert info.value.status == 400
    assert CANARY not in info.value.message
    return info.value


FOLDED = ["SSN", "Ssn", "\u017fsn", "\uff53\uff53\uff4e", " ssn", "ssn\t", "ssn\x00", "s\u200bsn"]


@pytest.mark.parametrize("key", FOLDED)
async def test_a_folded_key_is_encrypted_under_the_selectors_label(
    crypto: FieldCrypto, key: str
) -> None:
    sealed, labels = await seal(crypto, {key: CANARY, "name": "x"})
    assert labels == ["$.ssn"] and envelope.is_envelope(sealed[key])
    # An app that folds keys stores it as ssn and returns it there: the response rule opens it.
    route = make_route(FIELDS)
    body = orjson.dumps({"ssn": sealed[key]})
    opened, _, _ = await crypto.decrypt_body(body, route, route.response_decrypt, ())
    assert orjson.loads(opened) == {"ssn": CANARY}


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({"CARD": {"Number": CANARY}}, ("CARD", "Number")),
        ({"card.number": CANARY}, ("card.number",)),
        ({"card[number]": CANARY}, ("card[number]",)),
        ({"card['number']": CANARY}, ("card['number']",)),  # Spring's map-key syntax
        ({'card["Number"]': CANARY}, ('card["Number"]',)),
        ({"card\uff0enumber": CANARY}, ("card\uff0enumber",)),  # a fullwidth full stop
        ({"card. number ": CANARY}, ("card. number ",)),
        ({"Card.NUMBER": CANARY}, ("Card.NUMBER",)),
        ({"card": {"num\u00adber": CANARY}}, ("card", "num\u00adber")),
        ({"contacts[0][phone]": CANARY}, ("contacts[0][phone]",)),
        ({"contacts[1].phone": CANARY}, ("contacts[1].phone",)),
        ({"Contacts": [{"PHONE": CANARY}]}, ("Contacts", 0, "PHONE")),
    ],
)
async def test_folded_and_split_keys_reach_the_selector(
    crypto: FieldCrypto, doc: Any, where: tuple[Any, ...]
) -> None:
    sealed, labels = await seal(crypto, doc)
    node = sealed
    for step in where:
        node = node[step]
    assert envelope.is_envelope(node) and len(labels) == 1


async def test_a_folded_required_field_counts_as_present(crypto: FieldCrypto) -> None:
    _, labels = await seal(crypto, {"SSN": CANARY}, [{"path": "$.ssn", "required": True}])
    assert labels == ["$.ssn"]


@pytest.mark.parametrize(
    "doc",
    [
        {"ssn": CANARY, "SSN": "x"},
        {"ssn": CANARY, " ssn": "x"},
        {"ssn": CANARY, "\uff53\uff53\uff4e": "x"},
        {"card": {"number": CANARY, "NUMBER": "x"}},
        {"Card": {"number": CANARY}, "card": {"x": 1}},
        {"other": [{"Name": 1, "name": 2}]},  # any key: apps would pick either
        {"ssn\x00x": CANARY},  # C parsers stop at the NUL, others drop it
        {"\x00ssn": CANARY},
        {"x": {"a\x00b": 1}},
    ],
)
async def test_keys_that_fold_alike_are_refused(crypto: FieldCrypto, doc: Any) -> None:
    assert (await refused(crypto, doc)).code == "ambiguous_key"


@pytest.mark.parametrize(
    "doc",
    [
        {"contacts": {"phone": CANARY}},  # an object where the array was
        {"contacts": [[{"phone": CANARY}]]},  # one level deeper
        [{"ssn": CANARY}],  # a top-level array on an object route
        [[{"card": {"number": CANARY}}]],
        {"user": {"ssn": CANARY}},  # nested deeper than the selector
        {"card": {"x": {"number": CANARY}}},
        {"data": {"card": {"number": CANARY}}},
        {"x": {"SSN": 123}},  # other JSON types, folded
        {"x": {"ssn": True}},
        {"x": {"ssn": None}},
        {"x": {"ssn": {"v": CANARY}}},
        {"x": {"ssn": [TOKEN, CANARY]}},  # a container counts unless every leaf is a token
        {"x": {"ssn": "sc1." + CANARY}},  # the prefix alone is not a token
        {"x": {"ssn": TOKEN[:-30]}},
        {"card.number.value": CANARY},  # a split key reaching inside the field
        {"tags": CANARY},  # not the shape [*] expects
        {"x": {"tags": [CANARY]}},
    ],
)
async def test_protected_names_out_of_place_are_refused(crypto: FieldCrypto, doc: Any) -> None:
    error = await refused(crypto, doc)
    assert error.code == "unprotected_field"


async def test_the_refusal_names_the_path() -> None:
    plan = GuardPlan(compile_fields(FIELDS))
    with pytest.raises(RequestError, match=r"\$\.user\.ssn.*selector \$\.ssn") as info:
        plan.find_slots({"user": {"ssn": CANARY}})
    assert CANARY not in str(info.value)
    with pytest.raises(RequestError, match=r"\$\[\*\]\.ssn"):
        plan.find_slots([{"ssn": CANARY}])
    with pytest.raises(RequestError) as info:
        plan.find_slots({"k" * 5000: {"ssn": CANARY}})
    assert len(info.value.message) < 400  # a huge key is cut short


@pytest.mark.parametrize(
    "doc",
    [
        {"order": {"number": 5}},  # a generic last name with no card above it
        {"number": "1", "phone": "2"},
        {"card": {"exp": "12/30"}, "id": {"number": 1}},
        {"x": {"ssn": TOKEN}},  # already a token: nothing to protect
        {"x": {"ssn": [TOKEN, {"a": TOKEN}]}},
        {"x": {"ssn": []}},
        {"contacts": [{"name": "a"}]},
        {"tags": []},
    ],
)
async def test_names_that_are_not_protected_pass(crypto: FieldCrypto, doc: Any) -> None:
    route = make_route(FIELDS)
    raw = orjson.dumps(doc)
    assert (await crypto.encrypt_body(raw, route, route.request_encrypt, ()))[0] is raw


async def test_descendant_selectors_reach_every_place(crypto: FieldCrypto) -> None:
    doc = {"a": {"SSN": CANARY}, "b.ssn": CANARY, "c": [{"x": {"ssn": CANARY}}]}
    _, labels = await seal(crypto, doc, ["$..ssn"])
    assert sorted(labels) == ["$.a.ssn", "$.b.ssn", "$.c[*].x.ssn"]


async def test_an_index_selector_leaves_the_other_elements(crypto: FieldCrypto) -> None:
    sealed, labels = await seal(crypto, {"a": [CANARY, "two"]}, ["$.a[0]"])
    assert labels == ["$.a[*]"] and sealed["a"][1] == "two"


@pytest.mark.parametrize("depth", [300, 511])
async def test_deep_documents_do_not_exhaust_the_stack(crypto: FieldCrypto, depth: int) -> None:
    # orjson reads up to 1024 levels (511 of {"x": [...]}) but writes only 255
    body = b'{"x":[' * depth + f'{{"ssn":"{CANARY}"}}'.encode() + b"]}" * depth
    route = make_route(FIELDS)
    with pytest.raises(RequestError) as info:
        await crypto.encrypt_body(body, route, route.request_encrypt, ())
    assert info.value.status == 400 and CANARY not in info.value.message


def test_check_outgoing_is_the_last_stop() -> None:
    plan = GuardPlan(compile_fields(FIELDS))
    plan.check_outgoing({"ssn": "sc1.x", "card": {"number": "sc1.y"}, "tags": ["sc1.z"]})
    for doc in (
        {"SSN": CANARY},
        {"card.number": 4111},
        {"user": {"ssn": CANARY}},
        {"tags": ["sc1.z", CANARY]},
    ):
        with pytest.raises(PlaintextGuardError) as info:
            plan.check_outgoing(doc)
        assert info.value.status == 500 and CANARY not in info.value.message


def test_all_tokens() -> None:
    assert all_tokens(TOKEN) and all_tokens({"a": [TOKEN, {}]}) and all_tokens([])
    assert not all_tokens(None) and not all_tokens(1) and not all_tokens({"a": [TOKEN, "y"]})
    assert not all_tokens("sc1.x") and not all_tokens("sc1." + "A" * 80)


async def test_a_shape_seen_before_under_another_spelling(crypto: FieldCrypto) -> None:
    # {"a": {"b": ...}} and {"a.b": ...} share the chain a, b (and the route's memo of shapes);
    # only the first is the selector's exact place
    route = make_route(["$.a.b.ssn"])
    for doc, where in (
        ({"a": {"b": {"ssn": CANARY}}}, ("a", "b")),
        ({"a.b": {"ssn": CANARY}}, ("a.b",)),
    ):
        raw = orjson.dumps(doc)
        out, labels = await crypto.encrypt_body(raw, route, route.request_encrypt, ())
        node = orjson.loads(out)
        for step in where:
            node = node[step]
        assert labels == ["$.a.b.ssn"] and envelope.is_envelope(node["ssn"])
