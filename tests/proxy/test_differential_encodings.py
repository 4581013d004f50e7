"""Issue 16 class 6 through the real proxy: the same record posted as a urlencoded or multipart
form is encrypted field by field (and read back decrypted as JSON); JSON under another type,
and every body parsers could read differently, is refused with nothing forwarded.

The upstream parses forms with Python's stdlib (``parse_qsl``, the ``email`` multipart parser),
nests bracket and dot names the way qs and Spring do, stores the record and serves it as JSON:
it never receives a canary.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web
from tests.conftest import Certs, RunningProxy, Upstream

from sidecrypt.envelope import is_envelope
from sidecrypt.keyring import create_key

CANARY = "CANARY-form-5e1f"
FIELDS = ["$.ssn", "$.card.number", "$.contacts[*].phone"]


def form_fields(ctype: str, body: bytes) -> list[tuple[str, str]]:
    """The (name, value) pairs a Python app reads from a form body."""
    if ctype.lower().startswith("application/x-www-form-urlencoded"):
        return parse_qsl(body.decode(), keep_blank_values=True)
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body
    )
    return [
        (
            str(p.get_param("name", header="content-disposition")),
            p.get_payload(decode=True).decode(),
        )
        for p in msg.iter_parts()
    ]


def nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """qs / Spring nesting: ``card[number]``, ``card.number``, ``contacts[0][phone]``."""
    doc: dict[str, Any] = {}
    for name, value in pairs:
        parts = [p for p in re.split(r"[.\[\]]+", name) if p != ""]
        node: Any = doc
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            key: Any = int(part) if part.isdigit() else part.lower()
            if isinstance(key, int):
                if not isinstance(node, list):
                    break
                while len(node) <= key:
                    node.append({})
                if last:
                    node[key] = value
                else:
                    node = node[key]
                continue
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, [] if parts[i + 1].isdigit() else {})
    return doc


@pytest.fixture
async def setup(
    certs: Certs, tmp_path: Path, upstream_factory: Any, proxy_factory: Any
) -> AsyncIterator[tuple[RunningProxy, Upstream, aiohttp.ClientSession, dict[str, Any]]]:
    create_key(tmp_path / "keyring.json", "app")
    stored: dict[str, Any] = {}

    async def app(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.method == "GET":
            return web.json_response(stored.get(request.path, {}))
        if request.content_type == "application/json":
            stored[request.path] = json.loads(body)
        else:
            stored[request.path] = nest(form_fields(request.headers["Content-Type"], body))
        return web.json_response({"stored": True})

    up = await upstream_factory(app)
    proxy = await proxy_factory(
        {
            "upstream": {"url": up.url},
            "keys": {"app": {"provider": "local", "keyring": "keyring.json"}},
            "routes": [
                {
                    "match": {"path": "/users/**", "methods": ["POST", "PUT", "GET"]},
                    "key": "app",
                    "request": {"encrypt": FIELDS},
                    "response": {"decrypt": FIELDS},
                },
                {  # a method another route takes on the protected path without request rules
                    "match": {"path": "/users/**", "methods": ["PATCH"]},
                    "key": "app",
                    "response": {"decrypt": FIELDS},
                },
                {
                    "match": {"path": "/mixed/**", "methods": ["POST"]},
                    "key": "app",
                    "request": {"encrypt": ["$.ssn"], "decrypt": ["$.token"]},
                },
            ],
        },
        base_dir=tmp_path,
    )
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as client:
        yield proxy, up, client, stored


Setup = tuple[RunningProxy, Upstream, aiohttp.ClientSession, dict[str, Any]]
URLE = "application/x-www-form-urlencoded"


def mp(*parts: tuple[str, str], boundary: str = "b0und") -> tuple[str, bytes]:
    out = b""
    for name, value in parts:
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    return f"multipart/form-data; boundary={boundary}", out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize(
    ("ctype", "body", "where"),
    [
        (URLE, f"name=Ada&ssn={CANARY}", ("ssn",)),
        (URLE, f"name=Ada&SSN={CANARY}", ("ssn",)),
        (URLE + "; charset=UTF-8", f"ssn={CANARY}", ("ssn",)),
        ("Application/X-WWW-Form-URLEncoded", f"ssn={CANARY}", ("ssn",)),
        (URLE, f"card%5Bnumber%5D={CANARY}&card[exp]=12", ("card", "number")),
        (URLE, f"card.number={CANARY}", ("card", "number")),
        (URLE, f"contacts[0][phone]={CANARY}", ("contacts", 0, "phone")),
        (URLE, f"contacts[0].phone={CANARY}", ("contacts", 0, "phone")),
        (*mp(("name", "Ada"), ("ssn", CANARY)), ("ssn",)),
        (*mp(("card[number]", CANARY), ("x", "1")), ("card", "number")),
        (*mp(("contacts[0][phone]", CANARY)), ("contacts", 0, "phone")),
    ],
)
async def test_forms_are_encrypted_field_by_field_and_read_back(
    setup: Setup, ctype: str, body: str | bytes, where: tuple[Any, ...]
) -> None:
    proxy, up, client, stored = setup
    async with client.post(
        f"{proxy.url}/users/1", data=body, headers={"Content-Type": ctype}
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert CANARY.encode() not in up.all_bytes()
    node: Any = stored["/users/1"]
    for step in where:
        node = node[step]
    assert is_envelope(node)
    async with client.get(f"{proxy.url}/users/1") as resp:
        assert resp.status == 200
        doc = await resp.json()
    for step in where:
        doc = doc[step]
    assert doc == CANARY


async def test_repeated_protected_names_are_all_encrypted(setup: Setup) -> None:
    proxy, up, client, _ = setup
    async with client.post(
        f"{proxy.url}/users/1",
        data=f"ssn={CANARY}-1&Ssn={CANARY}-2&ssn={CANARY}-3",
        headers={"Content-Type": URLE},
    ) as resp:
        assert resp.status == 200
    sent = parse_qsl(up.seen[-1].body.decode())
    assert [n for n, _ in sent] == ["ssn", "Ssn", "ssn"]
    assert all(is_envelope(v) for _, v in sent)


REFUSED: list[tuple[str, Any, bytes | str, int]] = [
    # JSON under another type, or none: apps that parse it anyway would store it in plaintext.
    ("text-plain-json", {"Content-Type": "text/plain"}, json.dumps({"ssn": CANARY}), 415),
    ("no-type-json", None, json.dumps({"ssn": CANARY}), 415),
    ("x-json", {"Content-Type": "application/x-json"}, json.dumps({"ssn": CANARY}), 415),
    ("text-json", {"Content-Type": "text/json"}, json.dumps({"ssn": CANARY}), 415),
    ("octet", {"Content-Type": "application/octet-stream"}, json.dumps({"ssn": CANARY}), 415),
    ("json-latin1", {"Content-Type": "application/json; charset=iso-8859-1"}, "{}", 415),
    (
        "two-types",
        [("Content-Type", "application/json"), ("Content-Type", URLE)],
        f"ssn={CANARY}",
        400,
    ),
    (
        "two-encodings",
        [("Content-Type", URLE), ("Content-Encoding", "identity"), ("Content-Encoding", "gzip")],
        f"ssn={CANARY}",
        400,
    ),
    ("form-semicolon", {"Content-Type": URLE}, f"name=x;ssn={CANARY}", 400),
    ("form-json-body", {"Content-Type": URLE}, json.dumps({"ssn": CANARY}), 415),
    (
        "mp-charset",
        {"Content-Type": "multipart/form-data; boundary=b0und; charset=iso-8859-1"},
        mp(("ssn", CANARY))[1],
        415,
    ),
    ("form-bad-escape", {"Content-Type": URLE}, f"ssn={CANARY}%zz", 400),
    ("form-not-utf8", {"Content-Type": URLE}, f"ssn={CANARY}%ff", 400),
    ("form-latin1", {"Content-Type": URLE + "; charset=iso-8859-1"}, f"ssn={CANARY}", 415),
    ("form-drift", {"Content-Type": URLE}, f"user[ssn]={CANARY}", 400),
    ("form-whole", {"Content-Type": URLE}, f"ssn[]={CANARY}", 415),
    ("mp-no-boundary", {"Content-Type": "multipart/form-data"}, mp(("ssn", CANARY))[1], 400),
    (
        "mp-two-boundaries",
        {"Content-Type": "multipart/form-data; boundary=b0und; boundary=other"},
        mp(("ssn", CANARY))[1],
        415,
    ),
    (
        "mp-file",
        {"Content-Type": "multipart/form-data; boundary=b"},
        f'--b\r\nContent-Disposition: form-data; name="ssn"; filename="f"\r\n\r\n{CANARY}\r\n--b--',
        415,
    ),
    (
        "mp-json-part",
        {"Content-Type": "multipart/form-data; boundary=b"},
        "--b\r\nContent-Disposition: form-data; name=meta\r\nContent-Type: application/json"
        f'\r\n\r\n{{"ssn":"{CANARY}"}}\r\n--b--',
        415,
    ),
    (
        "mp-base64",
        {"Content-Type": "multipart/form-data; boundary=b"},
        "--b\r\nContent-Disposition: form-data; name=ssn\r\nContent-Transfer-Encoding: base64"
        "\r\n\r\nQ0FOQVJZ\r\n--b--",
        415,
    ),
    (
        "mp-bare-lf",
        {"Content-Type": "multipart/form-data; boundary=b"},
        f"--b\nContent-Disposition: form-data; name=ssn\n\n{CANARY}\n--b--",
        400,
    ),
    ("mixed-route-form", {"Content-Type": URLE}, f"ssn={CANARY}", 415),
]


@pytest.mark.parametrize(
    ("name", "headers", "body", "status"), REFUSED, ids=[r[0] for r in REFUSED]
)
async def test_other_encodings_are_refused_and_nothing_forwarded(
    setup: Setup, name: str, headers: Any, body: bytes | str, status: int
) -> None:
    proxy, up, client, _ = setup
    path = "/mixed/1" if name.startswith("mixed") else "/users/1"
    skip = ["Content-Type"] if headers is None else []
    async with client.post(
        f"{proxy.url}{path}", data=body, headers=headers, skip_auto_headers=skip
    ) as resp:
        text = await resp.text()
        assert resp.status == status, text
    assert CANARY not in text
    if resp.content_type != "application/json":  # aiohttp's parser refuses a repeated type
        assert name == "two-types"
    else:
        assert set(json.loads(text)) == {"error"}
    assert up.seen == []


@pytest.mark.parametrize(
    "ctype", ["application/json; charset=utf-8", "APPLICATION/JSON", "application/merge-patch+json"]
)
async def test_json_types_still_encrypt(setup: Setup, ctype: str) -> None:
    proxy, up, client, _ = setup
    async with client.post(
        f"{proxy.url}/users/1", data=json.dumps({"ssn": CANARY}), headers={"Content-Type": ctype}
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert CANARY.encode() not in up.all_bytes()


async def test_unprotected_paths_still_pass_forms_untouched(setup: Setup) -> None:
    proxy, up, client, _ = setup
    body = f"ssn={CANARY};x=%zz"
    async with client.post(
        f"{proxy.url}/other", data=body, headers={"Content-Type": "text/plain"}
    ) as resp:
        assert resp.status == 200
    assert up.seen[-1].body == body.encode()


@pytest.mark.parametrize(
    ("form", "status"),
    [
        (f"_method=PATCH&ssn={CANARY}", 400),  # the PATCH route has no request rules
        (mp(("_Method", "patch"), ("ssn", CANARY)), 400),
        (f"_method=put&ssn={CANARY}", 200),  # the same rules: encrypted as usual
        # No route lists DELETE: a body sent with it takes the protecting route's rules (the
        # methods rule), so the override selects the same rules and the form is encrypted.
        (f"_method=DELETE&ssn={CANARY}", 200),
    ],
)
async def test_a_method_override_field_must_keep_the_rules(
    setup: Setup, form: Any, status: int
) -> None:
    """Rails, Laravel and Symfony route a form by its _method field."""
    proxy, up, client, _ = setup
    ctype, body = (URLE, form) if isinstance(form, str) else form
    async with client.post(
        f"{proxy.url}/users/1", data=body, headers={"Content-Type": ctype}
    ) as resp:
        text = await resp.text()
        assert resp.status == status, text
    if status == 400:
        assert json.loads(text)["error"]["code"] == "method_override"
        assert up.seen == []
    assert CANARY.encode() not in up.all_bytes()


@pytest.mark.parametrize(
    "query", [f"ssn={CANARY}", f"SSN={CANARY}", f"card[number]={CANARY}", f"a=1;ssn={CANARY}"]
)
@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_a_protected_field_in_the_query_is_refused(
    setup: Setup, query: str, method: str
) -> None:
    """PHP's $_REQUEST, Rails params, Spring and ASP.NET bind query parameters as fields."""
    proxy, up, client, _ = setup
    async with client.request(
        method, f"{proxy.url}/users/1?{query}", json={"name": "a"} if method == "POST" else None
    ) as resp:
        text = await resp.text()
        assert resp.status == 400, text
    assert json.loads(text)["error"]["code"] == "protected_field_in_query"
    assert CANARY not in text
    assert up.seen == []
    async with client.post(f"{proxy.url}/users/1?name=ssn", json={"ssn": CANARY}) as resp:
        assert resp.status == 200
    assert CANARY.encode() not in up.all_bytes()


async def test_multipart_from_real_clients_is_encrypted(setup: Setup) -> None:
    """aiohttp's FormData and urllib3's encoder (requests) as they frame multipart."""
    import urllib3

    proxy, up, client, stored = setup
    form = aiohttp.FormData()
    form.add_field("ssn", CANARY)
    form.add_field("doc", b"\x00binary", filename="a.bin", content_type="application/octet-stream")
    async with client.post(f"{proxy.url}/users/1", data=form) as resp:
        assert resp.status == 200, await resp.text()
    body, ctype = urllib3.encode_multipart_formdata({"card[number]": CANARY, "name": "Ada"})
    async with client.post(
        f"{proxy.url}/users/2", data=body, headers={"Content-Type": ctype}
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert CANARY.encode() not in up.all_bytes()
    assert b"\x00binary" in up.seen[0].body
    assert is_envelope(stored["/users/1"]["ssn"]) and stored["/users/2"]["name"] == "Ada"
    async with client.get(f"{proxy.url}/users/2") as resp:
        assert (await resp.json())["card"]["number"] == CANARY
