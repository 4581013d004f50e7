"""Form bodies (pure): which names are protected, how urlencoded and multipart bodies are read,
refused and rebuilt (transform/form_names.py, forms.py, multipart.py)."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qsl, quote

import pytest

from sidecrypt.errors import RequestError
from sidecrypt.proxy.routes import compile_fields
from sidecrypt.transform.form_names import NameRules
from sidecrypt.transform.forms import (
    MAX_FIELDS,
    AmbiguousForm,
    UnprotectedFormField,
    UnsupportedForm,
    check_query,
    parse_media_type,
    rebuild_urlencoded,
    scan_urlencoded,
)
from sidecrypt.transform.multipart import MAX_PARTS, rebuild_multipart, scan_multipart

SPECS = compile_fields(
    [
        "$.ssn",
        "$.card.number",
        "$.contacts[*].phone",
        "$..secret",
        "$.card_number",
        "$.first[0]",
        "$.tags[*]",
    ]
)
RULES = NameRules(SPECS)
WHOLE = compile_fields(["$.card"])


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("ssn", "$.ssn"),
        ("SSN", "$.ssn"),
        ("\u017fsn", "$.ssn"),  # long s folds to s (Go)
        ("\uff53sn", "$.ssn"),  # fullwidth
        (" ssn\x00", "$.ssn"),
        ("card[number]", "$.card.number"),  # qs, Rack, PHP
        ("Card[NUMBER]", "$.card.number"),
        ("card.number", "$.card.number"),  # Spring, ASP.NET, qs allowDots
        ("card\uff0enumber", "$.card.number"),  # a fullwidth dot folds to "."
        ("card[number]x", "$.card.number"),  # PHP ignores what follows the last "]"
        ("contacts[0][phone]", "$.contacts[*].phone"),
        ("contacts[][phone]", "$.contacts[*].phone"),
        ("contacts.0.phone", "$.contacts[*].phone"),
        ("contacts[0].phone", "$.contacts[*].phone"),
        ("contacts[home][phone]", "$.contacts.home.phone"),  # [*] reaches object members too
        ("a[b][secret]", "$.a.b.secret"),
        ("card number", "$.card_number"),  # PHP: spaces and dots become "_"
        ("card[number", "$.card_number"),  # PHP: a lone "[" too
        ("first[]", "$.first[*]"),
        ("first", "$.first[*]"),  # first=a&first=b is a list to qs, Rack, Go, Python
        ("tags", "$.tags[*]"),
        ("first[0]", "$.first[*]"),
        ("first[1]", "$.first[*]"),  # qs compacts: first[1]=x alone is first[0]
    ],
)
def test_protected_names_are_encrypted_under_the_json_label(name: str, label: str) -> None:
    assert RULES.classify(name) is not None
    assert RULES.classify(name)[::2] == ("encrypt", label)


@pytest.mark.parametrize("name", ["name", "number", "card", "ssnx", "firsts", "contacts", "tag"])
def test_other_names_pass(name: str) -> None:
    assert RULES.classify(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "user[ssn]",
        "x[card][number]",
        "a.ssn",
        "[ssn]",
        "x[tags]",
        "first[x]",
        "x[tags][y]",
        "contacts[phone]",
    ],
)
def test_a_protected_name_out_of_place_is_drift(name: str) -> None:
    assert RULES.classify(name) is not None and RULES.classify(name)[0] == "drift"


@pytest.mark.parametrize("name", ["ssn[]", "ssn[x]", "card[number][0]"])
def test_a_name_inside_a_selected_value_is_whole(name: str) -> None:
    assert RULES.classify(name) is not None and RULES.classify(name)[0] == "whole"


def test_bind_as_gives_the_label() -> None:
    from sidecrypt.config import FieldSpec

    rules = NameRules(compile_fields([FieldSpec(path="$.ssn", bind_as="$.person.ssn")]))
    assert rules.classify("SSN") == ("encrypt", 0, "$.person.ssn")


# -- urlencoded ---------------------------------------------------------------------------------


def test_urlencoded_reads_like_parse_qsl_and_rebuilds_untouched_pairs_byte_for_byte() -> None:
    body = b"name=Ada+L%C3%B6w&ssn=123-45+6789&&card%5Bnumber%5D=4111%201111&empty=&bare&n=%2B1"
    pairs, found, _ = scan_urlencoded(body, RULES, SPECS)
    assert [(p.label, p.value) for p in found] == [
        ("$.ssn", "123-45 6789"),
        ("$.card.number", "4111 1111"),
    ]
    out = rebuild_urlencoded(pairs, found, ["tok:1/a+b", "tok:2"])
    assert parse_qsl(out.decode(), keep_blank_values=True) == [
        ("name", "Ada L\u00f6w"),
        ("ssn", "tok:1/a+b"),
        ("card[number]", "tok:2"),
        ("empty", ""),
        ("bare", ""),
        ("n", "+1"),
    ]
    assert out.startswith(b"name=Ada+L%C3%B6w&ssn=tok%3A1%2Fa%2Bb&&card%5Bnumber%5D=tok%3A2&")
    assert out.endswith(b"&empty=&bare&n=%2B1")


def test_every_occurrence_of_a_repeated_protected_name_is_encrypted() -> None:
    _, found, _ = scan_urlencoded(
        b"ssn=1&SSN=2&ssn=3&contacts[][phone]=4&contacts[][phone]=5", RULES, SPECS
    )
    assert [p.value for p in found] == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize(
    "body",
    [
        b"ssn=1;x=2",  # ";" separates pairs for some parsers
        b"ssn=%zz",  # invalid escapes: left as is by some, dropped or refused by others
        b"ssn=%4",
        b"s%sn=1",
        b"ssn=%ff",  # not UTF-8 once decoded
        b"ssn=\xff",
        b"_charset_=iso-8859-1&ssn=1",
        b"utf8=%26%2310003%3B&ssn=1",  # qs's sentinel for iso-8859-1
        b'{"ssn": "1"}',  # JSON under a form type: express.json({type: "*/*"}) reads it
        b' [{"ssn": "1"}]',
        b"\xef\xbb\xbfssn=1",  # a BOM: JSON parsers skip it
    ],
)
def test_bodies_parsers_could_read_differently_are_refused(body: bytes) -> None:
    with pytest.raises(RequestError) as err:
        scan_urlencoded(body, RULES, SPECS)
    assert err.value.status in (400, 415)
    assert "1" not in err.value.message and "iso" not in err.value.message


def test_refusals_name_the_rule_never_the_value() -> None:
    with pytest.raises(UnprotectedFormField, match=r"\$\.ssn") as err:
        scan_urlencoded(b"user[ssn]=CANARY-x", RULES, SPECS)
    assert "CANARY" not in err.value.message
    with pytest.raises(UnsupportedForm, match=r"\$\.card"):
        scan_urlencoded(b"card[number]=CANARY-x", NameRules(WHOLE), WHOLE)


def test_long_or_deep_names_are_refused_and_the_rest_is_bounded() -> None:
    specs = compile_fields(["$..a..b..c.d"])
    rules = NameRules(specs)
    deep = "x" + "[a][b][c]" * 10  # the most levels accepted: descendant steps stay cheap
    assert rules.classify(deep) is None
    assert rules.classify(deep + "[d]") is not None
    for name in ("x" + "[a]" * 33, "x" + ".a" * 33, "x" + "\uff0ea" * 33, "x" * 1001):
        with pytest.raises(AmbiguousForm):
            scan_urlencoded(quote(name).encode() + b"=1", rules, specs)
        with pytest.raises(RequestError):
            check_query(rules, quote(name) + "=1")


def test_required_fields_and_field_count() -> None:
    from sidecrypt.config import FieldSpec

    specs = compile_fields([FieldSpec(path="$.ssn", required=True)])
    with pytest.raises(RequestError) as err:
        scan_urlencoded(b"name=x", NameRules(specs), specs)
    assert err.value.code == "missing_field"
    with pytest.raises(RequestError) as err:
        scan_urlencoded(b"&".join([b"a=1"] * (MAX_FIELDS + 1)), RULES, SPECS)
    assert err.value.status == 413


@pytest.mark.parametrize(
    ("raw", "mime", "params"),
    [
        (
            "Application/X-WWW-Form-Urlencoded; Charset=UTF-8",
            URLE := "application/x-www-form-urlencoded",
            {"charset": "UTF-8"},
        ),
        ('multipart/form-data; boundary="a b"', "multipart/form-data", {"boundary": "a b"}),
        ("application/json;", "application/json", {}),
    ],
)
def test_media_types_parse(raw: str, mime: str, params: dict[str, str]) -> None:
    assert parse_media_type(raw) == (mime, params)


@pytest.mark.parametrize(
    "raw",
    [
        "multipart/form-data; boundary=a; boundary=b",
        "multipart/form-data; boundary*=utf-8''a",
        "application/json, text/plain",
        "json",
        "application/json; charset",
    ],
)
def test_ambiguous_media_types_are_refused(raw: str) -> None:
    with pytest.raises(UnsupportedForm):
        parse_media_type(raw)


# -- multipart ----------------------------------------------------------------------------------

B = "XyZ"


def multipart(*parts: bytes, boundary: str = B, end: bytes = b"--\r\n") -> bytes:
    delim = b"--" + boundary.encode()
    return b"".join(delim + b"\r\n" + p + b"\r\n" for p in parts) + delim + end


def part(name: str, value: bytes, *headers: str) -> bytes:
    head = [f'Content-Disposition: form-data; name="{name}"', *headers]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + value


def test_multipart_text_fields_are_encrypted_and_the_body_rebuilt() -> None:
    body = multipart(
        part("name", b"Ada"),
        part("card[number]", b"4111\r\n1111", "Content-Type: text/plain; charset=utf-8"),
        b'Content-Disposition: form-data; name="doc"; filename="a.txt"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n\x00\xffbinary-XyZ",
    )
    parts, found, _ = scan_multipart(body, B, RULES, SPECS)
    assert [(p.label, p.value) for p in found] == [("$.card.number", "4111\r\n1111")]
    out, ctype = rebuild_multipart(parts, found, ["TOKEN"])
    assert B not in ctype and ctype.startswith("multipart/form-data; boundary=")
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + out
    )
    got = [
        (p.get_param("name", header="content-disposition"), p.get_payload(decode=True))
        for p in msg.iter_parts()
    ]
    assert got == [("name", b"Ada"), ("card[number]", b"TOKEN"), ("doc", b"\x00\xffbinary-XyZ")]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"preamble\r\n" + multipart(part("ssn", b"1")), 400),
        (multipart(part("ssn", b"1"), end=b"--\r\nepilogue"), 400),
        (multipart(part("ssn", b"1"), end=b"\r\n"), 400),  # no close delimiter
        (multipart(part("ssn", b"1")).replace(b"\r\n", b"\n"), 400),  # bare LF framing
        (multipart(part("a", b"x\n--XyZ\r\n" + part("ssn", b"1"))), 400),  # LF delimiter inside
        (b"--XyZ \r\n" + part("ssn", b"1") + b"\r\n--XyZ--\r\n", 400),  # transport padding
        (multipart(part("ssn", b"1", " folded: x")), 400),
        (multipart(part("ssn", b"1", "Content-Length: 1")), 400),
        (multipart(part("ssn", b"1", "Content-Type: text/plain", "Content-Type: text/plain")), 400),
        (multipart(b"Content-Disposition: form-data; name=a; name=ssn\r\n\r\n1"), 400),
        (multipart(b"Content-Disposition: form-data; name*=utf-8''ssn\r\n\r\n1"), 400),
        (multipart(b'Content-Disposition: form-data; name="a\\"b"\r\n\r\n1'), 400),
        (multipart(b"Content-Disposition: attachment; name=ssn\r\n\r\n1"), 400),
        (multipart(b"Content-Type: text/plain\r\n\r\n1"), 400),
        (multipart(b"\r\n1"), 400),
        (multipart(part("ssn", b"\xff")), 400),
        (multipart(part("user[ssn]", b"1")), 400),
        (multipart(b'Content-Disposition: form-data; name="ssn"; filename="x"\r\n\r\n1'), 415),
        (multipart(part("ssn", b"MQ==", "Content-Transfer-Encoding: base64")), 415),
        (multipart(part("a", b"MQ==", "Content-Transfer-Encoding: quoted-printable")), 415),
        (multipart(part("ssn", b"1", "Content-Type: text/plain; charset=iso-8859-1")), 415),
        (multipart(part("ssn", b"1", "Content-Type: text/html")), 415),
        (multipart(part("meta", b'{"ssn":"1"}', "Content-Type: application/json")), 415),
        (multipart(part("m", b"--in--", "Content-Type: multipart/mixed; boundary=in")), 415),
        (multipart(part("_charset_", b"iso-8859-1"), part("ssn", b"1")), 415),
    ],
)
def test_multipart_framing_parsers_could_read_differently_is_refused(
    body: bytes, status: int
) -> None:
    with pytest.raises(RequestError) as err:
        scan_multipart(body, B, RULES, SPECS)
    assert err.value.status == status, err.value.message


def test_multipart_bounds_and_percent_encoded_names() -> None:
    with pytest.raises(RequestError) as err:
        scan_multipart(multipart(*[part("a", b"1")] * (MAX_PARTS + 1)), B, RULES, SPECS)
    assert err.value.status == 413
    _, found, _ = scan_multipart(multipart(part("card%5Bnumber%5D", b"1")), B, RULES, SPECS)
    assert [p.label for p in found] == ["$.card.number"]
    with pytest.raises(AmbiguousForm):
        scan_multipart(multipart(part("ssn", b"1")), "other", RULES, SPECS)


@pytest.mark.parametrize(
    "query",
    [
        "ssn=1",
        "SSN=1",
        "a=1;ssn=2",
        "card[number]=1",
        "card.number=1",
        "%73sn=1",
        "s%C5%BFn=1",
        "user[ssn]=1",
        "ssn",
        "x=1&contacts[0][phone]=2",
    ],
)
def test_a_query_naming_a_protected_field_is_refused(query: str) -> None:
    with pytest.raises(RequestError) as err:
        check_query(RULES, query)
    assert err.value.code == "protected_field_in_query"


@pytest.mark.parametrize("query", ["name=ssn", "page=2&sort=ssn", "q=card[number]", "%zz=1"])
def test_other_queries_pass(query: str) -> None:
    check_query(RULES, query)
