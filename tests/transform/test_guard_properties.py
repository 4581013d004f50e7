"""Property tests (issue 16): documents built to smuggle a canary past the selectors.

Hypothesis builds JSON bytes around the route's selectors: the protected names spelled as
apps fold them (case, long s, fullwidth, surrounding space, NUL, invisible characters),
merged into dotted or bracket keys, moved by shape drift (extra objects or arrays between the
names, an object where an array was, a top-level array), repeated as duplicate or folded keys
before or after the canary member, with \\u escapes in keys and values. The canary is a
string or a card-like number, alone or inside a container. Property: the body is refused
with a 400, or its output holds the canary nowhere: not in the bytes, not in any leaf as a
first-key-wins or a last-key-wins parser reads it, not under any protected name found by a
case-insensitive lookup. One test sends such documents through the real proxy to a recording
upstream.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import Certs, Upstream
from tests.proxy.test_fields import WrapProvider, make_route

from sidecrypt.errors import RequestError
from sidecrypt.keyring import create_key
from sidecrypt.keys import DataKeyService
from sidecrypt.proxy.fields import FieldCrypto
from sidecrypt.transform.fold import fold_key

CANARY = "canary-prop-3c71"
CANARY_NUMBER = 4111111111111111
NEEDLES = (CANARY, str(CANARY_NUMBER))
FIELDS = ["$.ssn", "$.card.number", "$.contacts[*].phone"]
PATHS = [("ssn",), ("card", "number"), ("contacts", "*", "phone")]
REFUSALS = {"duplicate_key", "ambiguous_key", "unprotected_field", "malformed_json"}

IGNORABLE = ["\x00", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\ufe0f", "\x1f"]
SPACE = [" ", "\t", "\n", "\u00a0", "\u3000"]

# A node: ("obj", [(key, node), ...]) keeps duplicates and order; ("arr", [...]); ("val", x).
Node = tuple[str, Any]


@st.composite
def spelling(draw: st.DrawFn, name: str) -> str:
    """``name`` as an app that folds keys would still read it."""
    out = []
    for ch in name:
        how = draw(st.sampled_from(["same", "same", "upper", "fullwidth", "long-s"]))
        if how == "upper":
            ch = ch.upper()
        elif how == "fullwidth":
            ch = chr(ord(ch) - 0x20 + 0xFF00)
        elif how == "long-s" and ch == "s":
            ch = "\u017f"
        out.append(ch)
    if draw(st.booleans()):
        out.insert(draw(st.integers(0, len(out))), draw(st.sampled_from(IGNORABLE)))
    text = "".join(out)
    if draw(st.booleans()):
        text = draw(st.sampled_from(SPACE)) + text + draw(st.sampled_from(["", *SPACE]))
    return text


noise_keys = st.sampled_from(["id", "name", "x", "data", "items", "meta", "Number", "phones"])
noise_values = st.one_of(
    st.integers(-5, 5), st.sampled_from(["v", "a:b", "\u00e9", ""]), st.booleans(), st.none()
)


@st.composite
def canary_value(draw: st.DrawFn) -> Node:
    leaf: Node = ("val", draw(st.sampled_from([CANARY, CANARY_NUMBER])))
    shape = draw(st.sampled_from(["plain", "plain", "list", "object", "mixed"]))
    if shape == "list":
        return ("arr", [leaf])
    if shape == "object":
        return ("obj", [(draw(noise_keys), leaf)])
    if shape == "mixed":
        return ("arr", [("val", "sc1.notatoken"), leaf])
    return leaf


@st.composite
def with_noise(draw: st.DrawFn, members: list[tuple[str, Node]]) -> Node:
    """An object holding ``members``, noise around them and maybe a repeated key."""
    out = list(members)
    for _ in range(draw(st.integers(0, 2))):
        out.insert(draw(st.integers(0, len(out))), (draw(noise_keys), ("val", draw(noise_values))))
    if members and draw(st.integers(0, 3)) == 0:  # a duplicate or folded twin, before or after
        key = members[0][0]
        twin = draw(st.sampled_from([key, key.upper(), " " + key, key + "\x00"]))
        decoy: Node = ("val", draw(st.sampled_from(["x", 0])))
        if draw(st.booleans()):
            out.insert(0, (twin, decoy))
        else:
            out.append((twin, decoy))
    return ("obj", out)


@st.composite
def smuggled(draw: st.DrawFn) -> Node:
    """One selector's path, spelled, merged, drifted and wrapped, ending at the canary."""
    path = draw(st.sampled_from(PATHS))
    names = [n for n in path if n != "*"]
    keys = [draw(spelling(n)) for n in names]
    # Merge adjacent names into one key, as qs and Spring read them.
    if len(keys) > 1 and draw(st.booleans()):
        style = draw(st.sampled_from(["dot", "bracket", "index"]))
        if style == "dot":
            keys = [".".join(keys)]
        elif style == "bracket":
            keys = [keys[0] + "".join(f"[{k}]" for k in keys[1:])]
        else:
            keys = [f"{keys[0]}[0][{keys[1]}]" if len(keys) == 2 else keys[0]]
    node = draw(canary_value())
    for i in reversed(range(len(keys))):
        node = draw(with_noise([(keys[i], node)]))
        between = draw(st.sampled_from(["none", "none", "list", "object"]))
        if i > 0 or path == ("contacts", "*", "phone"):
            if path == ("contacts", "*", "phone") and i == 1 and between == "none":
                between = draw(st.sampled_from(["list", "none", "object"]))
            if between == "list":
                node = ("arr", [node])
            elif between == "object":
                node = draw(with_noise([(draw(noise_keys), node)]))
    if draw(st.booleans()):  # a top-level array of records, or the field nested deeper
        node = ("arr", [node]) if draw(st.booleans()) else draw(with_noise([("data", node)]))
    return node


def escape(text: str, everything: bool) -> str:
    """A JSON string body; ``everything``: letters and digits as \\u escapes too."""
    if not everything:
        return json.dumps(text, ensure_ascii=False)[1:-1]
    return "".join(
        f"\\u{ord(c):04x}" if c.isascii() and c.isalnum() else json.dumps(c)[1:-1] for c in text
    )


@st.composite
def raw_json(draw: st.DrawFn, node: Node) -> bytes:
    """JSON bytes for ``node``, each key and string escaped or not."""

    def write(n: Node) -> str:
        kind, value = n
        if kind == "obj":
            items = (f'"{escape(k, draw(st.booleans()))}":{write(v)}' for k, v in value)
            return "{" + ",".join(items) + "}"
        if kind == "arr":
            return "[" + ",".join(write(v) for v in value) + "]"
        if isinstance(value, str):
            return '"' + escape(value, draw(st.booleans())) + '"'
        return json.dumps(value)

    return write(node).encode()


documents = smuggled().flatmap(raw_json)


def first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def leaves(doc: Any) -> Iterator[Any]:
    if isinstance(doc, dict):
        for value in doc.values():
            yield from leaves(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from leaves(value)
    else:
        yield doc


def folded_lookup(doc: Any, name: str) -> Iterator[Any]:
    """Every value under a key that folds to ``name`` (or ends a dotted/bracket key with it)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            parts = [p for p in fold_key(key).replace("[", ".").replace("]", ".").split(".") if p]
            if parts and parts[-1] == name:
                yield value
            yield from folded_lookup(value, name)
    elif isinstance(doc, list):
        for value in doc:
            yield from folded_lookup(value, name)


def assert_no_canary(out: bytes) -> None:
    for needle in NEEDLES:
        assert needle.encode() not in out
    for parsed in (json.loads(out), json.loads(out, object_pairs_hook=first_wins)):
        for leaf in leaves(parsed):
            assert not any(n in str(leaf) for n in NEEDLES), leaf
        for name in ("ssn", "number", "phone"):
            for value in folded_lookup(parsed, name):
                assert not any(n in str(v) for v in leaves(value) for n in NEEDLES)


def assert_refusal(error: RequestError) -> None:
    assert error.status == 400 and error.code in REFUSALS, error.code
    assert not any(n in error.message for n in NEEDLES)


@pytest.fixture(scope="module")
def runner() -> Iterator[tuple[asyncio.AbstractEventLoop, FieldCrypto]]:
    loop = asyncio.new_event_loop()
    yield loop, FieldCrypto(DataKeyService({"app": WrapProvider("app")}))
    loop.close()


def test_field_crypto_never_lets_the_canary_through(
    runner: tuple[asyncio.AbstractEventLoop, FieldCrypto],
) -> None:
    loop, crypto = runner
    route = make_route(FIELDS)
    outcomes: Counter[str] = Counter()

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(documents)
    def check(raw: bytes) -> None:
        try:
            out, _ = loop.run_until_complete(
                crypto.encrypt_body(raw, route, route.request_encrypt, ())
            )
        except RequestError as exc:
            assert_refusal(exc)
            outcomes[exc.code] += 1
            return
        assert_no_canary(out)
        outcomes["encrypted"] += 1

    check()
    # Both outcomes occur: the generator reaches the selectors and drifts past them.
    assert outcomes["encrypted"] and outcomes["unprotected_field"], outcomes


@pytest.mark.parametrize("mode", ["server-side", "client-side"])
async def test_the_upstream_never_receives_the_canary(
    certs: Certs, tmp_path: Any, upstream: Upstream, proxy_factory: Any, mode: str
) -> None:
    create_key(tmp_path / "keyring.json", "app")
    raw_config: dict[str, Any] = {
        "upstream": {"url": upstream.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json", "reload_interval": 0}},
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/users/**"},
                "key": "app",
                "request": {"encrypt": FIELDS},
            }
        ],
    }
    client_side = mode == "client-side"
    if client_side:  # beside the client on loopback; the test upstream is plain HTTP
        raw_config.update(mode="client-side", allow_plain_upstream=True)
    proxy = await proxy_factory(raw_config, base_dir=tmp_path, tls=not client_side)
    bodies: list[bytes] = []

    @settings(max_examples=60, deadline=None, database=None)
    @given(documents)
    def collect(raw: bytes) -> None:
        bodies.append(raw)

    collect()
    statuses: Counter[int] = Counter()
    connector = aiohttp.TCPConnector(ssl=False if client_side else certs.client_context())
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        for raw in bodies:
            headers = {"Content-Type": "application/json"}
            async with client.post(f"{proxy.url}/users", data=raw, headers=headers) as resp:
                text = await resp.text()
                statuses[resp.status] += 1
                assert resp.status in (200, 400), text
                assert not any(n in text for n in NEEDLES)  # refusals and the echo alike
    for seen in upstream.seen:
        assert_no_canary(seen.body)
    assert statuses[400] and statuses[200], statuses
