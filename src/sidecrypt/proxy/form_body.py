"""Which body a route that transforms request fields accepts, and form bodies' encryption.

The rule (docs/operations.md, "What sidecrypt refuses and why"): on such a route the body is
JSON (``application/json`` or ``+json``, UTF-8), a urlencoded form or a multipart form, named
by exactly one ``Content-Type`` and at most one ``Content-Encoding``. Anything else is 415,
whatever the bytes look like: JSON under ``text/plain`` or with no type at all is refused,
not guessed, since apps differ on whether they parse it. Forms are encrypted field by field
(transform/forms.py, transform/multipart.py) on routes that only encrypt; a route that also
decrypts request fields takes JSON only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_plus

from aiohttp import hdrs

from ..envelope import build_header, dumps_json, is_envelope, seal
from ..errors import CryptoError, RequestError, SidecryptError
from ..keys import Context, DataKeyService
from ..transform.form_names import NameRules
from ..transform.forms import (
    Protected,
    UnsupportedForm,
    check_charset,
    check_query,
    parse_media_type,
    rebuild_urlencoded,
    scan_urlencoded,
)
from ..transform.multipart import boundary_of, rebuild_multipart, scan_multipart
from .incoming import RequestView
from .routes import CompiledRoute

URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
# JSON whose values sit where no field selector looks (RFC 6902 puts them under "value").
OPAQUE_JSON = frozenset({"application/json-patch+json"})
_EXPECTED = "application/json"
_EXPECTED_FORMS = f"application/json, {URLENCODED} or {MULTIPART}"


class PlaintextGuardError(SidecryptError):
    """A protected form field still held plaintext after encryption: the body must not leave."""

    status = 500
    code = "plaintext_guard"


Kind = Literal["json", "urlencoded", "multipart"]


@dataclass(frozen=True, slots=True)
class BodyKind:
    kind: Kind
    params: Mapping[str, str]


def body_kind(request: RequestView, route: CompiledRoute) -> BodyKind:
    """The body's kind on a route that transforms it; 415/400 for anything else."""
    headers = request.headers
    types = headers.getall(hdrs.CONTENT_TYPE, ())
    # Forms carry what the route encrypts; a route that decrypts or tokenizes takes JSON only.
    forms_ok = not route.request_decrypt and not route.tokens_request
    expected = _EXPECTED_FORMS if forms_ok else _EXPECTED
    if len(types) > 1 or len(headers.getall(hdrs.CONTENT_ENCODING, ())) > 1:
        raise RequestError(
            "Content-Type or Content-Encoding is given twice", code="duplicate_header"
        )
    if not types:
        raise UnsupportedForm(f"this route encrypts fields: send Content-Type: {expected}")
    mime, params = parse_media_type(types[0])
    if (mime == "application/json" or mime.endswith("+json")) and mime not in OPAQUE_JSON:
        check_charset(params, "a JSON body")
        return BodyKind("json", params)
    if forms_ok and mime == URLENCODED:
        check_charset(params, "a form body")
        return BodyKind("urlencoded", params)
    if forms_ok and mime == MULTIPART:
        check_charset(params, "a multipart body")  # busboy decodes names and values by it
        boundary_of(params)
        return BodyKind("multipart", params)
    raise UnsupportedForm(f"this route encrypts fields: send Content-Type: {expected}")


class FormCrypto:
    """Encrypts the protected fields of form bodies through the data key service."""

    def __init__(self, keys: DataKeyService) -> None:
        self.keys = keys
        self._rules: dict[int, tuple[CompiledRoute, NameRules]] = {}
        self._query_rules: dict[int, tuple[CompiledRoute, NameRules]] = {}

    def check_query(self, route: CompiledRoute, raw_path: str) -> None:
        """Refuse a query parameter naming a field the route encrypts or tokenizes
        (forms.check_query). Lookup parameters are tokenized in the target (tokenize.py),
        which refuses their other spellings itself."""
        query = raw_path.partition("?")[2]
        if not query:
            return
        rules = self.query_rules(route)
        if rules is None:
            return
        lookups = {name for name, _ in route.tokens.query} if route.tokens is not None else ()
        if lookups:
            query = "&".join(
                part
                for part in query.split("&")
                if unquote_plus(part.partition("=")[0]) not in lookups
            )
        check_query(rules, query)

    def rules(self, route: CompiledRoute) -> NameRules:
        held = self._rules.get(id(route))
        if held is None or held[0] is not route:
            held = self._rules[id(route)] = (route, NameRules(route.request_encrypt))
        return held[1]

    def query_rules(self, route: CompiledRoute) -> NameRules | None:
        """The names a query must not carry: encrypted and tokenized fields; None if none."""
        tokenized = route.tokens.request_tokenize if route.tokens is not None else ()
        if not tokenized:
            return self.rules(route) if route.request_encrypt else None
        held = self._query_rules.get(id(route))
        if held is None or held[0] is not route:
            fields = (*route.request_encrypt, *(rule.field for rule in tokenized))
            held = self._query_rules[id(route)] = (route, NameRules(fields))
        return held[1]

    async def encrypt_body(
        self,
        kind: BodyKind,
        body: bytes,
        route: CompiledRoute,
        context: Context,
        check_override: Callable[[str], None],
    ) -> tuple[bytes, str | None, list[str]]:
        """The new body, its new Content-Type (None: unchanged) and the labels encrypted.

        ``check_override`` sees the value of each ``_method`` field before any key is used.
        """
        rules = self.rules(route)
        specs = route.request_encrypt
        ctype: str | None = None
        if kind.kind == "urlencoded":
            scan = scan_urlencoded(body, rules, specs)
            for value in scan.overrides:
                check_override(value)
            if not scan.found:
                return body, None, []
            tokens = await self._seal(scan.found, route, context)
            out = rebuild_urlencoded(scan.items, scan.found, tokens)
            again = scan_urlencoded(out, rules, specs).found
        else:
            scan = scan_multipart(body, boundary_of(kind.params), rules, specs)
            for value in scan.overrides:
                check_override(value)
            tokens = await self._seal(scan.found, route, context)
            out, ctype = rebuild_multipart(scan.items, scan.found, tokens)
            again = scan_multipart(out, boundary_of(parse_media_type(ctype)[1]), rules, specs).found
        # The plaintext guard, for forms: read the outgoing body as the app will.
        if len(again) != len(scan.found) or not all(is_envelope(p.value) for p in again):
            raise PlaintextGuardError(
                "plaintext guard: a protected form field is not encrypted; the body was not sent"
            )
        return out, ctype, [p.label for p in scan.found]

    async def _seal(
        self, found: list[Protected], route: CompiledRoute, context: Context
    ) -> list[str]:
        """One token per value: the value as a JSON string, bound to its field's label."""
        if not found:
            return []
        name = route.key
        if name is None:
            raise CryptoError(f"route {route.label} encrypts fields but names no key")
        service = self.keys
        plains = [dumps_json(p.value) for p in found]
        dk = service.cached_for_encrypt_many(name, context, sum(map(len, plains)), len(plains))
        tokens = []
        for item, plaintext in zip(found, plains, strict=True):
            one = dk
            if one is None:
                one = service.cached_for_encrypt(name, context, len(plaintext))
                if one is None:
                    one = await service.for_encrypt(name, context, len(plaintext))
            header = one.header
            if header is None:
                header = one.header = build_header(
                    one.provider.type_name, name, one.key_version, context, one.wrapped
                )
            tokens.append(seal(plaintext, one.aead, header=header, label=item.label))
        return tokens
