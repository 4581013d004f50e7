"""Duplicate JSON keys (issue 16 class 4): refused at any depth, whatever the escapes.

check_duplicates compares ':' counts of the body and of orjson's re-serialisation; a body with
the escape \\u003a gets the exact stdlib check. Both paths are exercised, and FieldCrypto
refuses through them on encrypt and (for request bodies) on decrypt.
"""

from __future__ import annotations

import orjson
import pytest
from tests.proxy.test_fields import WrapProvider, make_route

from sidecrypt.envelope import loads_json
from sidecrypt.errors import RequestError
from sidecrypt.keys import DataKeyService
from sidecrypt.proxy.fields import FieldCrypto
from sidecrypt.transform import duplicates
from sidecrypt.transform.duplicates import DuplicateKeyError, check_duplicates

CANARY = "canary-dup-91b2"

DUPLICATED = [
    b'{"a":1,"a":2}',
    b'{"card":{"number":"' + CANARY.encode() + b'"},"card":{"x":1}}',
    b'{"ssn":"' + CANARY.encode() + b'","\\u0073sn":"x"}',  # the same key, escaped
    b'{"\\u0073\\u0073\\u006e":"x","ssn":"y"}',
    b'{"s\\/n":1,"s/n":2}',
    b'{"a":{"b":{"c":[{"d":1,"d":2}]}}}',  # at any depth
    b'[1,{"x":[{"k":"v:w","k":"z"}]}]',
    b'{"a":"\\u003a","a":"b"}',  # the escape that forces the exact check
    b'{"a":"\\u003A:","b":1,"b":2}',
    b'{"big":123456789012345678901234567890,"big":1}',  # the stdlib parser's path
    b' { "a" : 1 , "a" : 2 } ',
]

CLEAN = [
    b'{"a":"x:y","b":"::","c":{"d":":"}}',
    b'{"a":"\\u003a","b":"\\u003A"}',
    b'[{"a":1},{"a":1}]',  # equal keys in different objects are fine
    b'{"ssn":"1","SSN":"2"}',  # folding is the guard's business, not this check's
    b'{"big":123456789012345678901234567890}',
    b'"a:b"',
    b"[]",
    b"{}",
]


@pytest.mark.parametrize("body", DUPLICATED)
def test_duplicates_are_refused(body: bytes) -> None:
    with pytest.raises(DuplicateKeyError) as info:
        check_duplicates(body, loads_json(body))
    assert info.value.status == 400 and info.value.code == "duplicate_key"
    assert CANARY not in info.value.message


@pytest.mark.parametrize("body", CLEAN)
def test_documents_without_duplicates_pass(body: bytes) -> None:
    check_duplicates(body, loads_json(body))


def test_the_slow_check_runs_only_for_the_colon_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    monkeypatch.setattr(duplicates, "_exact", calls.append)
    check_duplicates(b'{"a":"x:y"}', {"a": "x:y"})
    assert calls == []
    check_duplicates(b'{"a":"\\u003a"}', {"a": ":"})
    assert calls == [b'{"a":"\\u003a"}']


@pytest.fixture
def crypto() -> FieldCrypto:
    return FieldCrypto(DataKeyService({"app": WrapProvider("app")}))


@pytest.mark.parametrize("body", DUPLICATED)
async def test_encrypt_body_refuses_duplicates(crypto: FieldCrypto, body: bytes) -> None:
    route = make_route(["$.card.number", "$.ssn"])
    with pytest.raises(RequestError) as info:
        await crypto.encrypt_body(body, route, route.request_encrypt, ())
    assert info.value.code == "duplicate_key"


async def test_request_decrypt_refuses_duplicates_responses_do_not(crypto: FieldCrypto) -> None:
    route = make_route(["$.ssn"])
    body = b'{"ssn":"x","ssn":"y"}'
    with pytest.raises(RequestError) as info:
        await crypto.decrypt_body(body, route, route.response_decrypt, (), refuse_duplicates=True)
    assert info.value.code == "duplicate_key"
    out, _, _ = await crypto.decrypt_body(body, route, route.response_decrypt, ())
    assert orjson.loads(out) == {"ssn": "y"}
