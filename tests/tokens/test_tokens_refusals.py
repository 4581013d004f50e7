"""A tokenizing route holds the same line as an encrypting one: keys that fold or split to a
selected name are tokenized, duplicates and drifted shapes are refused, a query or a form cannot
carry a tokenized field past the rules, and the upstream never sees a canary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecrypt.keyring import create_key

SSN = "123-45-6789"
CARD = "4111111111111111"
CANARIES = (SSN.encode(), CARD.encode(), b"123456789")


@pytest.fixture
async def setup(tmp_path: Path, upstream: Any, proxy_factory: Any) -> tuple[Any, Any]:
    create_key(tmp_path / "keyring.json", "app")
    raw = {
        "upstream": {"url": upstream.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json"}},
        "stores": {"vault": {"type": "sqlite", "path": str(tmp_path / "vault.db")}},
        "routes": [
            {
                "match": {"methods": ["POST", "PUT"], "path": "/users/**"},
                "key": "app",
                "lookup": {"query": {"email": {"format": "email", "consistent": True}}},
                "request": {
                    "tokenize": [
                        {"path": "$.ssn", "format": "ssn", "consistent": True},
                        {"path": "$.card.number", "format": "card"},
                    ]
                },
            }
        ],
    }
    proxy = await proxy_factory(raw, tls=False, base_dir=tmp_path)
    return proxy, upstream


async def _post(proxy: Any, body: bytes, ctype: str = "application/json", qs: str = "") -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proxy.url}/users/1{qs}", data=body, headers={"Content-Type": ctype}) as resp,
    ):
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)


def _clean(upstream: Any) -> None:
    sent = upstream.all_bytes()
    for canary in CANARIES:
        assert canary not in sent


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({"SSN": SSN}, ("SSN",)),
        ({"\u017fsn": SSN}, ("\u017fsn",)),
        ({"card.number": CARD}, ("card.number",)),
        ({"card[number]": CARD}, ("card[number]",)),
        ({"Card": {"Number": CARD}}, ("Card", "Number")),
    ],
)
async def test_keys_that_fold_or_split_to_a_selected_name_are_tokenized(
    setup: tuple[Any, Any], doc: dict[str, Any], where: tuple[str, ...]
) -> None:
    proxy, upstream = setup
    status, _ = await _post(proxy, json.dumps(doc).encode())
    assert status == 200
    sent: Any = json.loads(upstream.seen[-1].body)
    for key in where:
        sent = sent[key]
    assert isinstance(sent, str) and sent not in (SSN, CARD)
    _clean(upstream)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"ssn": "123-45-6789", "ssn": "987-65-4321"}', "duplicate_key"),
        (b'{"ssn": "987-65-4321", "\\u0073sn": "123-45-6789"}', "duplicate_key"),
        (b'{"ssn": "987-65-4321", "SSN": "123-45-6789"}', "ambiguous_key"),
        (b'{"user": {"ssn": "123-45-6789"}}', "unprotected_field"),
        (b'[{"ssn": "123-45-6789"}]', "unprotected_field"),
        (b'{"card": {"x": {"number": "4111111111111111"}}}', "unprotected_field"),
    ],
)
async def test_documents_sidecrypt_and_the_app_could_read_apart_are_refused(
    setup: tuple[Any, Any], body: bytes, code: str
) -> None:
    proxy, upstream = setup
    status, err = await _post(proxy, body)
    assert status == 400 and err["error"]["code"] == code, err
    assert upstream.seen == []


async def test_a_query_naming_a_tokenized_field_is_refused(setup: tuple[Any, Any]) -> None:
    proxy, upstream = setup
    status, err = await _post(proxy, b"{}", qs=f"?ssn={SSN}")
    assert status == 400 and err["error"]["code"] == "protected_field_in_query", err
    status, err = await _post(proxy, b"{}", qs="?card%5Bnumber%5D=" + CARD)
    assert status == 400 and err["error"]["code"] == "protected_field_in_query", err
    assert upstream.seen == []
    # A lookup parameter is tokenized, not refused.
    status, err = await _post(proxy, b"{}", qs="?email=ada.lovelace@example.org")
    assert status == 200, err
    assert b"ada.lovelace@example.org" not in upstream.all_bytes()


@pytest.mark.parametrize(
    "ctype",
    ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"],
)
async def test_a_body_that_is_not_json_is_refused(setup: tuple[Any, Any], ctype: str) -> None:
    proxy, upstream = setup
    body = f"ssn={SSN}".encode()
    if ctype.startswith("multipart"):
        body = (
            b'--x\r\nContent-Disposition: form-data; name="ssn"\r\n\r\n'
            + SSN.encode()
            + b"\r\n--x--\r\n"
        )
    status, err = await _post(proxy, body, ctype)
    assert status == 415 and err["error"]["code"] == "unsupported_media_type", err
    assert upstream.seen == []
