"""The attack corpus: every way issue 16 found (and the variants found since) to get a protected
field to the app in plaintext. One row per form; a new class or variant is one more row.

The proxy protects ``POST``/``PUT /users/**`` (``$.ssn``, ``$.card.number``,
``$.contacts[*].phone``, ``$.kyc_id``); ``/public/**`` is not protected. Each row carries
canary values in a place some real app would read as a protected field. Expected for every row
on every upstream: a 2xx or a 4xx, and no canary in anything the upstream received or stored.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass

CANARY = "CANARY0"  # every canary value starts with it; searched case-insensitively
SSN = CANARY + "SSN123456789"
CARD = CANARY + "CARD4111111111111111"
PHONE = CANARY + "PHONE5551234"
KYC = CANARY + "KYC42"

JSON = (("Content-Type", "application/json"),)
FORM = (("Content-Type", "application/x-www-form-urlencoded"),)


@dataclass(frozen=True)
class Row:
    name: str
    cls: int  # issue 16's class (1 methods ... 6 encodings)
    body: bytes = b""
    method: str = "POST"
    target: str = "/users/1"
    headers: tuple[tuple[str, str], ...] = JSON
    chunked: bool = False
    # Headers that, when they do not reach the app, make the row harmless whatever the body
    # (a rewrite header stripped: the app routes on the path the proxy saw).
    harmless_if_absent: tuple[str, ...] = ()


def j(doc: object) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode()


def multipart(fields: dict[str, str], boundary: str = "corpusBOUNDARY") -> tuple[bytes, str]:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    ]
    return (
        "".join(parts) + f"--{boundary}--\r\n"
    ).encode(), f"multipart/form-data; boundary={boundary}"


_B = "corpusBOUNDARY"
# A multipart part that is itself JSON (Spring's @RequestPart, ASP.NET's [FromForm] JSON).
_MP_JSON = (
    f'--{_B}\r\nContent-Disposition: form-data; name="user"\r\n'
    f"Content-Type: application/json\r\n\r\n"
    + json.dumps({"ssn": SSN, "card": {"number": CARD}})
    + f"\r\n--{_B}--\r\n"
).encode()
_MP_JSON_TYPE = f"multipart/form-data; boundary={_B}"
SSN_DOC = j({"name": "alice", "ssn": SSN})
FULL_DOC = j(
    {"name": "alice", "ssn": SSN, "card": {"number": CARD}, "contacts": [{"phone": PHONE}]}
)
_MP, _MP_TYPE = multipart({"name": "alice", "ssn": SSN})
_MP_BRACKETS, _MP_BRACKETS_TYPE = multipart({"card[number]": CARD, "contacts[0][phone]": PHONE})


def _methods() -> list[Row]:
    rows = [Row("method DELETE chunked", 1, SSN_DOC, method="DELETE", chunked=True)]
    rows += [
        Row(f"method {m}", 1, SSN_DOC, method=m)
        for m in (
            "PATCH",
            "DELETE",
            "OPTIONS",
            "GET",
            "HEAD",
            "PROPPATCH",
            "MERGE",
            "PURGE",
            "REPORT",
            "LOCK",
            "SEARCH",
            "X-CUSTOM",
            "FOO",
        )
    ]
    rows += [Row(f"method case {m}", 1, SSN_DOC, method=m) for m in ("post", "Post", "pUT")]
    for header in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
        rows.append(
            Row(
                f"override {header} on PATCH",
                1,
                SSN_DOC,
                method="PATCH",
                headers=(*JSON, (header, "POST")),
            )
        )
        rows.append(
            Row(
                f"override {header} on GET",
                1,
                SSN_DOC,
                method="GET",
                headers=(*JSON, (header, "PUT")),
            )
        )
    rows += [
        Row("override _method query", 1, SSN_DOC, method="PATCH", target="/users/1?_method=POST"),
        Row("override _method query GET", 1, SSN_DOC, method="GET", target="/users/1?_method=PUT"),
        Row(
            "override _method form field",
            1,
            f"_method=PUT&ssn={SSN}".encode(),
            method="PATCH",
            headers=FORM,
        ),
    ]
    return rows


def _paths() -> list[Row]:
    targets = {
        "encoded slash": "/users%2F1",
        "encoded slash lower": "/users%2f1",
        "encoded letter": "/%75sers/1",
        "double-encoded letter": "/%2575sers/1",
        "space": "/users%20/1",
        "leading space": "/%20users/1",
        "tab": "/users%09/1",
        "newline": "/users%0a/1",
        "crlf": "/users%0d%0a/1",
        "NUL": "/users%00/1",
        "double-encoded slash": "/users%252F1",
        "dot-dot encoded slash": "/public/..%2Fusers/1",
        "dot-dot double encoded": "/public/..%252Fusers/1",
        "encoded dot segment": "/public/%2e%2e/users/1",
        "raw dot segment": "/public/../users/1",
        "backslash encoded": "/public%5c..%5cusers/1",
        "trailing dot": "/users./1",
        "encoded trailing dot": "/users%2e/1",
        "fullwidth u": "/%EF%BD%95sers/1",
        "fullwidth USERS": "/%EF%BC%B5%EF%BC%B3%EF%BC%A5%EF%BC%B2%EF%BC%B3/1",
        "zero-width space": "/users%E2%80%8B/1",
        "zero-width joiner": "/us%E2%80%8Ders/1",
        "BOM": "/%EF%BB%BFusers/1",
        "IIS %u": "/%u0075sers/1",
        "IIS %u upper": "/%U0055SERS/1",
        "encoded upper letter": "/%55SERS/1",
        "encoded semicolon": "/users%3Bx/1",
        "overlong slash": "/users%c0%af1",
        "upper case": "/USERS/1",
        "mixed case": "/Users/1",
        "matrix param": "/users;jsessionid=1/1",
        "empty matrix": "/users;/1",
        "double slash": "//users/1",
        "dot slash": "/./users/1",
        "no trailing part": "/users",
        "trailing slash": "/users/",
        "absolute form": "http://localhost/users/1",
    }
    rows = [Row(f"path {name}", 2, SSN_DOC, target=t) for name, t in targets.items()]
    for header, value, target in (
        ("X-Original-URL", "/users/1", "/public/x"),
        ("X-Rewrite-URL", "/users/1", "/public/x"),
        ("X-Original-URI", "/users/1", "/public/x"),
        ("X-Forwarded-Prefix", "/users", "/1"),
        ("X-Forwarded-Path", "/users/1", "/public/x"),
    ):
        rows.append(
            Row(
                f"rewrite {header}",
                2,
                SSN_DOC,
                target=target,
                headers=(*JSON, (header, value)),
                harmless_if_absent=(header,),
            )
        )
    return rows


def _keys() -> list[Row]:
    ssn_keys = {
        "upper": "SSN",
        "title": "Ssn",
        "long s": "\u017fsn",
        "long s upper": "\u017fSN",
        "fullwidth": "\uff53\uff53\uff4e",
        "trailing NUL": "ssn\u0000",
        "inner NUL": "s\u0000sn",
        "leading space": " ssn",
        "trailing space": "ssn ",
        "tab": "\tssn",
        "newline": "ssn\n",
        "nbsp": "ssn\u00a0",
        "ideographic space": "\u3000ssn",
    }
    rows = [Row(f"key ssn {n}", 3, j({"name": "a", k: SSN})) for n, k in ssn_keys.items()]
    rows += [
        Row("key Kelvin kyc_id", 3, j({"\u212ayc_id": KYC})),
        Row("key KYC_ID", 3, j({"KYC_ID": KYC})),
        Row("key card NUMBER", 3, j({"card": {"NUMBER": CARD}})),
        Row("key CARD number", 3, j({"Card": {"number": CARD}})),
        Row("key fullwidth card", 3, j({"\uff43ard": {"number": CARD}})),
        Row("key contacts PHONE", 3, j({"contacts": [{"PHONE": PHONE}]})),
        Row("key CONTACTS phone", 3, j({"CONTACTS": [{"phone": PHONE}]})),
        Row("key escaped long s", 3, b'{"\\u017fsn": "' + SSN.encode() + b'"}'),
        Row("key escaped upper", 3, b'{"\\u0053SN": "' + SSN.encode() + b'"}'),
        Row("key long s in contacts", 3, j({"contact\u017f": [{"phone": PHONE}]})),
    ]
    return rows


def _duplicates() -> list[Row]:
    s = SSN.encode()
    return [
        Row("dup ssn plaintext first", 4, b'{"ssn": "' + s + b'", "ssn": "x"}'),
        Row("dup ssn escaped second", 4, b'{"ssn": "' + s + b'", "\\u0073sn": "x"}'),
        Row("dup ssn escaped first", 4, b'{"\\u0073sn": "' + s + b'", "ssn": "x"}'),
        Row("dup ssn case", 4, b'{"SSN": "' + s + b'", "ssn": "x"}'),
        Row(
            "dup card object",
            4,
            b'{"card": {"number": "' + CARD.encode() + b'"}, "card": {"x": 1}}',
        ),
        Row("dup card number", 4, b'{"card": {"number": "' + CARD.encode() + b'", "number": "1"}}'),
        Row(
            "dup phone in array",
            4,
            b'{"contacts": [{"phone": "' + PHONE.encode() + b'", "phone": "1"}]}',
        ),
        Row(
            "dup contacts",
            4,
            b'{"contacts": [{"phone": "' + PHONE.encode() + b'"}], "contacts": []}',
        ),
        Row(
            "dup escaped at depth",
            4,
            b'{"card": {"number": "' + CARD.encode() + b'", "n\\u0075mber": "1"}}',
        ),
        Row("dup deep", 4, b'{"a": {"b": {"ssn": "' + s + b'", "ssn": "x"}}}'),
    ]


def _shapes() -> list[Row]:
    return [
        Row("shape contacts object", 5, j({"contacts": {"phone": PHONE}})),
        Row("shape contacts numeric keys", 5, j({"contacts": {"0": {"phone": PHONE}}})),
        Row("shape contacts map of objects", 5, j({"contacts": {"home": {"phone": PHONE}}})),
        Row("shape contacts nested arrays", 5, j({"contacts": [[{"phone": PHONE}]]})),
        Row("shape card array", 5, j({"card": [{"number": CARD}]})),
        Row("shape top-level array", 5, j([{"ssn": SSN}, {"ssn": SSN}])),
        Row("shape dotted key", 5, j({"card.number": CARD})),
        Row("shape bracket key", 5, j({"card[number]": CARD})),
        Row("shape dotted array key", 5, j({"contacts[0].phone": PHONE})),
        Row("shape bracket array key", 5, j({"contacts[0][phone]": PHONE})),
        Row("shape nested user", 5, j({"user": {"ssn": SSN}})),
        Row("shape nested data card", 5, j({"data": {"card": {"number": CARD}}})),
        Row("shape deep", 5, j({"a": [{"b": {"c": {"ssn": SSN}}}]})),
        Row(
            "shape escaped canary",
            5,
            b'{"ssn": "' + "".join(f"\\u{ord(c):04x}" for c in SSN).encode() + b'"}',
        ),
        Row("shape chunked", 5, FULL_DOC, chunked=True),
        # Lenient parsers (Newtonsoft, JSON5, Jackson's ALLOW_* features) read these as JSON.
        Row("lenient single quotes", 5, b"{'ssn': '" + SSN.encode() + b"'}"),
        Row("lenient trailing comma", 5, b'{"ssn": "' + SSN.encode() + b'",}'),
        Row("lenient comment", 5, b'{"ssn": /* c */ "' + SSN.encode() + b'"}'),
        Row("lenient BOM", 5, "\ufeff".encode() + SSN_DOC),
    ]


def _encodings() -> list[Row]:
    return [
        Row("form ssn", 6, f"name=a&ssn={SSN}".encode(), headers=FORM),
        Row("form SSN", 6, f"SSN={SSN}".encode(), headers=FORM),
        Row("form card[number]", 6, f"card[number]={CARD}".encode(), headers=FORM),
        Row("form card.number", 6, f"card.number={CARD}".encode(), headers=FORM),
        Row("form contacts[0][phone]", 6, f"contacts[0][phone]={PHONE}".encode(), headers=FORM),
        Row(
            "form percent-encoded",
            6,
            ("ssn=" + "".join(f"%{b:02X}" for b in SSN.encode())).encode(),
            headers=FORM,
        ),
        Row(
            "form charset",
            6,
            f"ssn={SSN}".encode(),
            headers=(("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),),
        ),
        Row("multipart ssn", 6, _MP, headers=(("Content-Type", _MP_TYPE),)),
        Row("multipart json part", 6, _MP_JSON, headers=(("Content-Type", _MP_JSON_TYPE),)),
        Row("multipart brackets", 6, _MP_BRACKETS, headers=(("Content-Type", _MP_BRACKETS_TYPE),)),
        Row("json as text/plain", 6, FULL_DOC, headers=(("Content-Type", "text/plain"),)),
        Row("json without content type", 6, FULL_DOC, headers=()),
        Row(
            "json as octet-stream",
            6,
            FULL_DOC,
            headers=(("Content-Type", "application/octet-stream"),),
        ),
        Row(
            "json +json suffix",
            6,
            FULL_DOC,
            headers=(("Content-Type", "application/vnd.api+json"),),
        ),
        Row("json upper-case type", 6, FULL_DOC, headers=(("Content-Type", "APPLICATION/JSON"),)),
        Row(
            "json utf-16",
            6,
            FULL_DOC.decode().encode("utf-16"),
            headers=(("Content-Type", "application/json; charset=utf-16"),),
        ),
        Row("json gzip", 6, gzip.compress(FULL_DOC), headers=(*JSON, ("Content-Encoding", "gzip"))),
        Row(
            "json deflate",
            6,
            zlib.compress(FULL_DOC),
            headers=(*JSON, ("Content-Encoding", "deflate")),
        ),
        Row("form ssn[]", 6, f"ssn[]={SSN}".encode(), headers=FORM),
        Row(
            "two content types",
            6,
            FULL_DOC,
            headers=(("Content-Type", "text/plain"), ("Content-Type", "application/json")),
        ),
        Row("query ssn", 6, j({"name": "a"}), target=f"/users/1?ssn={SSN}"),
        Row("query card[number]", 6, j({"name": "a"}), target=f"/users/1?card[number]={CARD}"),
    ]


ROWS: list[Row] = [*_methods(), *_paths(), *_keys(), *_duplicates(), *_shapes(), *_encodings()]

# Controls: the corpus cannot pass by refusing everything.
PUBLIC_ROWS: list[Row] = [
    Row("public json", 0, j({"name": "alice", "note": "hi"}), target="/public/echo"),
    Row("public get", 0, b"", method="GET", target="/public/page?x=1&y=%20z", headers=()),
    Row("public form", 0, b"name=alice&note=hi", target="/public/form", headers=FORM),
]
PROTECTED_ROWS: list[Row] = [
    Row("protected POST", 0, FULL_DOC, target="/users/1"),
    Row("protected PUT", 0, FULL_DOC, method="PUT", target="/users/1"),
    Row("protected nested path", 0, j({"ssn": SSN, "kyc_id": KYC}), target="/users/1/profile"),
]
