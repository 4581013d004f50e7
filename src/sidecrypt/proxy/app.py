"""The proxy application: one catch-all handler, field transforms on matched routes.

Unmatched requests and non-JSON bodies stream through untouched. On a matched route the JSON
body is read once (bounded), transformed, re-checked by the plaintext guard and only then
forwarded. Every failure on a route that must encrypt ends here, as a JSON error, with nothing
sent upstream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pluggy
from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import istr
from yarl import URL

from .. import appkeys
from ..config import Settings
from ..decisions import Decider, purpose_of
from ..errors import (
    AccessDenied,
    AuditError,
    CryptoError,
    RequestError,
    SidecryptError,
    UpstreamError,
)
from ..events import AuditEvent, new_event
from ..hookcall import DirectHook
from ..keys import CacheLimits, DataKeyService
from ..plugin_manager import build_providers, build_stores
from ..tokens.table import vault_table
from ..tokens.vault import Vault
from ..transform import overrides, paths
from . import admin, forward, tls
from .fields import FieldCrypto
from .form_body import BodyKind, FormCrypto, body_kind
from .incoming import RequestView, base_request
from .routes import CompiledRoute, Hit, Router
from .tokenize import TokenFields
from .upstream import UpstreamPool, UpstreamResponse

log = logging.getLogger(__name__)

# A body on these has no defined meaning (RFC 9110 9.3.1/9.3.2); some servers ignore it and read
# it as the next request. On a path whose bodies are protected, one is refused.
BODYLESS_METHODS = frozenset({"GET", "HEAD"})
READINGS_CACHE = 4096  # (method, raw path) decisions of the path rule kept per proxy
_REQUEST_ID = istr("X-Request-Id")
# A client's id is kept when it is one a log line or a header can carry as it is (UUIDs, hex,
# base64, W3C trace ids); anything else is replaced by sidecrypt's own.
_VALID_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
JSON_TYPES = ("application/json",)
SMALL_BODY = 256 * 1024  # bodies up to this size with a known length are sent in one write
# CONNECT asks for a tunnel, TRACE echoes the request (credentials included) back: neither has a
# place behind a field-encrypting proxy (nginx refuses TRACE too).
REFUSED_METHODS = frozenset(
    "".join(spelling)
    for name in ("CONNECT", "TRACE")
    for spelling in itertools.product(*({c, c.lower()} for c in name))
)  # in every letter case (a lenient parser passes "trace"), at the cost of one set lookup


def is_json(content_type: str) -> bool:
    return content_type in JSON_TYPES or content_type.endswith("+json")


def error_response(exc: SidecryptError, request_id: str | None = None) -> web.Response:
    body = exc.to_json()
    if request_id:
        body["error"]["request_id"] = request_id
    retry = getattr(exc, "retry_after", None)  # key provider or store unavailable
    headers = {"Retry-After": str(retry)} if isinstance(retry, int) else None
    return web.json_response(body, status=exc.status, headers=headers)


class Proxy:
    """Holds what the handler needs, resolved once at start-up."""

    def __init__(self, settings: Settings, pm: pluggy.PluginManager, keys: DataKeyService) -> None:
        self.settings = settings
        self.pm = pm
        self.keys = keys
        self.router = Router(settings.routes, default_max_body=settings.server.max_body_size)
        self.fields = FieldCrypto(keys)
        self.forms = FormCrypto(keys)
        self.tokens: TokenFields | None = None  # set by create_app when a route tokenizes
        self.base = URL(settings.upstream.url)
        # Host as RFC 9110 writes it: the scheme's default port left out, IPv6 in brackets.
        self.upstream_host = self.base.host_port_subcomponent or ""
        self.pool: UpstreamPool | None = None
        self.base_path = self.base.raw_path.rstrip("/")
        hdr = settings.identity.header
        # Identity headers are for sidecrypt; the app behind it must never see (or trust) them.
        self.drop_headers = (
            frozenset(h.lower() for h in (hdr.principal_header, hdr.roles_header))
            if hdr is not None
            else frozenset()
        )
        self.mtls = settings.listen.tls is not None and settings.listen.tls.client_ca is not None
        self.observers: list[appkeys.RequestObserver] = []
        self.audit_gate: Callable[[], bool] = lambda: True
        self._ids = itertools.count(1)
        self.in_flight = 0  # requests being handled (a gauge in /metrics)
        self._id_prefix = os.urandom(4).hex()
        # Hooks called several times per request go through DirectHook (hookcall.py): pluggy's
        # order and semantics without its per-call bookkeeping.
        self._audit = DirectHook(pm.hook.sidecrypt_audit)
        self._identify = DirectHook(pm.hook.sidecrypt_identify)
        self._authorize = DirectHook(pm.hook.sidecrypt_authorize)
        self._readings_ok: dict[tuple[str, str], bool] = {}

    def gauges(self) -> dict[str, int]:
        pool = self.pool
        open_, idle = (pool.open_count, pool.idle_count) if pool is not None else (0, 0)
        return {"in_flight": self.in_flight, "upstream_open": open_, "upstream_idle": idle}

    def audit(self, event: AuditEvent) -> None:
        self._audit.call1("event", event)

    # -- the handler --------------------------------------------------------------------------

    async def handle(self, request: RequestView) -> web.StreamResponse:
        """Every request; observers (metrics) learn its status and duration.

        One coroutine rather than a wrapper around another: every await in a request resumes
        through each frame above it.
        """
        started = time.perf_counter()
        status = 500
        self.in_flight += 1
        rid = request.headers.get(_REQUEST_ID, "")
        if not rid or _VALID_ID.fullmatch(rid) is None:
            rid = f"{self._id_prefix}-{next(self._ids)}"
        request[appkeys.REQUEST_ID] = rid
        route: CompiledRoute | None = None
        response: web.StreamResponse | None = None
        step = "route"
        try:
            if request.method in REFUSED_METHODS:
                raise RequestError(
                    f"{request.method} is not proxied", status=405, code="method_not_allowed"
                )
            forward.check_path(request)
            method = request.method
            match, guard = self.router.lookup(method, request.path)
            if self.router.has_rules:
                raw, _, query = request.raw_path.partition("?")
                if paths.TRIVIAL(raw) is None:
                    self._check_readings(method, raw, match, guard)
                if query and ("%" in query or "method" in query.lower()):
                    for value in overrides.query_overrides(query):
                        self.check_method_override(request, value)
                if (
                    guard is not None
                    and (match is None or not match[0].needs_request_body)
                    and request.body_exists
                ):
                    match = self._unlisted_method(method, match, guard)
            if match is None:
                response = await self._forward(request, None, None, None)
            else:
                route, params = match
                headers = request.headers
                request[appkeys.ROUTE] = route.label
                self._identify_caller(request)
                if not self.audit_gate():
                    raise AuditError(
                        "the audit trail cannot record; refusing to use keys unaudited"
                    )
                step = "context"
                context = route.context(headers, params, request.query)
                if (route.request_encrypt or route.tokens_request) and "?" in request.raw_path:
                    self.forms.check_query(route, request.raw_path)
                target: str | None = None
                if route.tokens is not None and route.tokens.lookups:
                    step = "lookup"
                    target = await self._lookup_target(request, route, context)
                body: bytes | None = None
                ctype: str | None = None
                if route.needs_request_body:
                    step = "request_body"
                    read = await self._read_request_json(request, route)
                    if read is not None:
                        step = "request_transform"
                        body, kind = read
                        if kind.kind == "json":
                            for value in overrides.json_overrides(body):
                                self.check_method_override(request, value)
                            body = await self._transform_request(request, route, body, context)
                        else:
                            body, ctype = await self._transform_form(
                                request, route, kind, body, context
                            )
                step = "upstream"
                response = await self._forward(request, route, context, body, ctype, target)
        except SidecryptError as exc:
            self._log_failure(request, route, step, exc)
            response = error_response(exc, rid)
            response.headers[_REQUEST_ID] = rid
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self.in_flight -= 1
            if self.observers:
                if response is not None:
                    status = response.status
                    request[appkeys.RESPONSE_BYTES] = (
                        response.content_length
                        if response.content_length is not None
                        else response.body_length or None
                    )
                seconds = time.perf_counter() - started
                for observe in self.observers:
                    observe(request, status, seconds)
        return response

    def _check_readings(self, method: str, raw: str, match: Hit | None, guard: Hit | None) -> None:
        """Refuse a target that some router would read as other field rules (transform/paths.py).

        Decisions are cached per method and raw path: a client repeating a target pays once.
        """
        key = (method, raw)
        ok = self._readings_ok.get(key)
        if ok is None:
            ok = not self.router.ambiguous(method, raw, match, guard)
            if len(raw) <= 1024:  # long targets are rare: they need not crowd the cache
                if len(self._readings_ok) >= READINGS_CACHE:
                    self._readings_ok.clear()
                self._readings_ok[key] = ok
        if not ok:
            raise RequestError(
                "the request target reads as a path with other field rules once normalized "
                "(encoding, case, Unicode, dots or spaces): send the path as routed",
                code="ambiguous_path",
            )

    def _unlisted_method(self, method: str, match: Hit | None, guard: Hit) -> Hit:
        """A body on a path whose bodies are protected, sent with a method no route for it
        protects: the protecting route's rules apply, or the request is refused."""
        if method.upper() in BODYLESS_METHODS:
            raise RequestError(
                f"{method} with a body is not accepted on a path whose request bodies are "
                "protected",
                code="body_not_allowed",
            )
        if match is not None:
            raise RequestError(
                f"route {match[0].label!r} takes {method} on this path without the request "
                f"rules of route {guard[0].label!r}: list the method there, or add rules",
                status=405,
                code="method_not_protected",
            )
        return guard

    def check_method_override(self, request: RequestView, value: str) -> None:
        """Refuse a method override (a ``_method`` query, form or JSON field: see
        transform/overrides.py) that would make the app apply other field rules than
        sidecrypt's reading of the real method does. Form parsers call it with each value of
        ``overrides.query_overrides(form_text)``.

        Override headers never reach the app (forward.STRIPPED_REQUEST_HEADERS); a field
        cannot be dropped without rewriting the target or body, so it is checked here.
        """
        path = request.path
        theirs = self.router.reading(value.strip(), path)
        ours = self.router.reading(request.method, path)
        if any(a is not b for a, b in zip(theirs, ours, strict=True)):
            raise RequestError(
                "a _method override would select other field rules than the request method",
                code="method_override",
            )

    def _log_failure(
        self, request: RequestView, route: CompiledRoute | None, step: str, exc: SidecryptError
    ) -> None:
        if route is not None:
            self.audit(
                AuditEvent(
                    "request_failed",
                    outcome="denied" if exc.status == 403 else "error",
                    key=route.key,
                    route=route.label,
                    request_id=request[appkeys.REQUEST_ID],
                    principal=_principal_id(request),
                    step=step,
                    error=exc.code,  # as in the JSON error body: stable, never a value
                )
            )
        level = logging.WARNING if exc.status < 500 else logging.ERROR
        log.log(
            level,
            "request failed",
            extra={
                "request_id": request[appkeys.REQUEST_ID],
                "route": route.label if route else None,
                "step": step,
                "status": exc.status,
                "code": exc.code,
                "error": exc.message,
            },
        )

    async def _read_request_json(
        self, request: RequestView, route: CompiledRoute
    ) -> tuple[bytes, BodyKind] | None:
        """The request body of a route that must transform it and its kind (JSON or a form;
        anything else is refused: form_body.py), or None when there is none."""
        if not request.body_exists:
            return None
        if request.content_length is not None and request.content_length > route.max_body_size:
            raise forward.too_large("request body", route.max_body_size)
        kind = body_kind(request, route)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        gzipped = encoding == "gzip" and route.allow_gzip
        if encoding not in ("", "identity") and not gzipped:
            raise RequestError(
                f"Content-Encoding {encoding!r} is not accepted on a route that encrypts fields",
                status=415,
                code="unsupported_encoding",
            )
        limit = route.max_body_size
        body = await self._read_whole(request.content, limit)
        # A decoded body goes upstream without Content-Encoding (transformed bodies drop it).
        if gzipped:
            body = forward.gunzip_limited(body, limit, what="request body")
        return body, kind

    async def _transform_form(
        self, request: RequestView, route: CompiledRoute, kind: BodyKind, body: bytes, context: Any
    ) -> tuple[bytes, str | None]:
        """A form body's protected fields encrypted; its new Content-Type if that changes."""

        def check_override(value: str) -> None:  # Rails, Laravel, Symfony route by _method
            self.check_method_override(request, value)

        body, ctype, labels = await self.forms.encrypt_body(
            kind, body, route, context, check_override
        )
        self._field_event("encrypt_fields", request, route, context, labels)
        return body, ctype

    async def _transform_request(
        self, request: RequestView, route: CompiledRoute, body: bytes, context: Any
    ) -> bytes:
        if route.request_decrypt:
            try:
                body, labels, _ = await self.fields.decrypt_body(
                    body, route, route.request_decrypt, context, refuse_duplicates=True
                )
            except CryptoError as exc:  # the client sent a token we cannot open: its mistake
                raise RequestError(exc.message, status=400, code=exc.code) from None
            self._field_event("decrypt_fields", request, route, context, labels)
        if route.tokens_request:
            body = await self._request_tokens(request, route, body, context)
        if route.request_encrypt:
            body, labels = await self.fields.encrypt_body(
                body, route, route.request_encrypt, context
            )
            self._field_event("encrypt_fields", request, route, context, labels)
        return body

    def _token_fields(self, route: CompiledRoute) -> tuple[TokenFields, str]:
        if self.tokens is None or route.key is None:  # config checks make this unreachable
            raise CryptoError(f"route {route.label} tokenizes but has no vault or key")
        return self.tokens, route.key

    async def _lookup_target(self, request: RequestView, route: CompiledRoute, context: Any) -> str:
        tokens, name = self._token_fields(route)
        target, labels = await tokens.lookup_target(request.raw_path, name, route.tokens, context)
        self._field_event("tokenize_fields", request, route, context, labels)
        return target

    async def _request_tokens(
        self, request: RequestView, route: CompiledRoute, body: bytes, context: Any
    ) -> bytes:
        tokens, name = self._token_fields(route)
        rules = route.tokens
        if rules.request_detokenize:  # a client that sends tokens it wants resolved
            try:
                body, labels, _ = await tokens.detokenize_body(
                    body, name, rules.request_detokenize, context
                )
            except CryptoError as exc:  # as with request decrypt: the client's token, a 400
                raise RequestError(exc.message, status=400, code=exc.code) from None
            self._field_event("detokenize_fields", request, route, context, labels)
        if rules.request_tokenize:
            body, labels = await tokens.tokenize_body(body, name, rules.request_tokenize, context)
            self._field_event("tokenize_fields", request, route, context, labels)
        return body

    async def _response_tokens(
        self, request: RequestView, route: CompiledRoute, body: bytes, context: Any
    ) -> bytes:
        tokens, name = self._token_fields(route)
        rules = route.tokens
        if rules.response_detokenize:
            decide = self._decider(request, route)
            try:
                body, labels, _outcomes = await tokens.detokenize_body(
                    body, name, rules.response_detokenize, context, decide=decide
                )
            except RequestError as exc:
                raise _upstream_body_error(exc) from None
            self._field_event("detokenize_fields", request, route, context, labels)
            rid = request[appkeys.REQUEST_ID]
            for event in decide.audit_events(request_id=rid, context=dict(context)):
                self.audit(event)
        if rules.response_tokenize:
            try:
                body, labels = await tokens.tokenize_body(
                    body, name, rules.response_tokenize, context
                )
            except RequestError as exc:
                raise _upstream_body_error(exc) from None
            self._field_event("tokenize_fields", request, route, context, labels)
        return body

    def _field_event(
        self,
        action: str,
        request: RequestView,
        route: CompiledRoute,
        context: Any,
        labels: list[str],
        outcome: Any = "ok",
    ) -> None:
        if not labels:
            return
        provider = self.keys.providers.get(route.key or "")
        self.audit(
            new_event(
                action,
                outcome=outcome,
                key=route.key,
                provider=provider.type_name if provider else None,
                context=dict(context),
                fields=tuple(labels),
                count=len(labels),
                request_id=request[appkeys.REQUEST_ID],
                route=route.label,
                principal=_principal_id(request),
            )
        )

    # -- forwarding ---------------------------------------------------------------------------

    async def _forward(
        self,
        request: RequestView,
        route: CompiledRoute | None,
        context: Any,
        body: bytes | None,
        content_type: str | None = None,
        target: str | None = None,
    ) -> web.StreamResponse:
        assert self.pool is not None
        transformed = body is not None
        wants_response = route is not None and route.needs_response_body
        headers = forward.request_headers(
            request,
            upstream_host=self.upstream_host,
            preserve_host=self.settings.upstream.preserve_host,
            keep_length=not transformed,
            identity_encoding=wants_response,
            drop=self.drop_headers,
            request_id=request[appkeys.REQUEST_ID],
        )
        if content_type is not None:  # a re-serialised multipart body has a new boundary
            headers = [h for h in headers if h[0].lower() != "content-type"]
            headers.append(("Content-Type", content_type))
        data: Any
        if transformed:
            data = body
        elif not request.body_exists:
            data = None
        elif request.content_length is not None and request.content_length <= SMALL_BODY:
            data = await self._read_whole(request.content)
        else:
            data = forward.iter_body(request.content, self.settings.server.body_timeout)
        target = forward.upstream_target(self.base_path, target or request.raw_path)
        started = time.perf_counter()
        upstream = await self.pool.request(request.method, target, headers, data)
        try:
            request[appkeys.UPSTREAM_SECONDS] = time.perf_counter() - started
            if wants_response and route is not None:
                return await self._respond_transformed(request, route, context, upstream)
            return await self._respond_streamed(request, upstream)
        finally:
            upstream.release()

    async def _read_whole(self, content: StreamReader, limit: int | None = None) -> bytes:
        """A client's body read whole (413 past ``limit``); a client that stalls mid-body gets a
        408 rather than holding the handler, and one that breaks the body a 400.

        Small pass-through bodies are read from ``content``, not ``request.read()``: on
        aiohttp's engine that would refuse one over ``server.max_body_size``, the limit for
        bodies a route transforms.
        """
        try:
            if content.is_eof():  # all of it arrived with the head: nothing to wait for
                body = content.read_nowait()
            else:
                async with asyncio.timeout(self.settings.server.body_timeout):
                    if limit is None:
                        return await content.read()
                    return await forward.read_limited(content, limit, what="request body")
        except TimeoutError:
            raise RequestError(
                "the request body did not arrive in time", status=408, code="body_timeout"
            ) from None
        except forward.BODY_ERRORS as exc:
            raise forward.bad_body(exc) from None
        return body if limit is None else forward.within(body, limit, what="request body")

    async def _respond_streamed(
        self, request: RequestView, upstream: UpstreamResponse
    ) -> web.StreamResponse:
        length = upstream.content_length
        no_body = request.method == "HEAD" or upstream.status in (204, 304)
        if no_body or (length is not None and length <= SMALL_BODY):
            payload = b"" if no_body else await upstream.read()
            headers = forward.response_headers(
                upstream.headers, keep_length=no_body, request_id=request[appkeys.REQUEST_ID]
            )
            resp = web.Response(status=upstream.status, reason=upstream.reason, headers=headers)
            if payload:
                resp.body = payload
            return resp
        headers = forward.response_headers(
            upstream.headers, keep_length=True, request_id=request[appkeys.REQUEST_ID]
        )
        stream = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        await stream.prepare(base_request(request))
        try:
            while chunk := await upstream.readany():
                await stream.write(chunk)
        except UpstreamError as exc:
            # Headers are out: the only honest signal left is to cut the connection.
            log.warning("upstream failed mid-response", extra={"error": type(exc).__name__})
            if request.transport is not None:
                request.transport.close()
            return stream
        await stream.write_eof()
        return stream

    async def _respond_transformed(
        self,
        request: RequestView,
        route: CompiledRoute,
        context: Any,
        upstream: UpstreamResponse,
    ) -> web.StreamResponse:
        no_body = request.method == "HEAD" or upstream.status in (204, 304)
        json_body = is_json(upstream.content_type)
        if no_body or (
            not json_body
            and not route.response_encrypt
            and not (route.tokens_response and route.tokens.response_tokenize)
        ):
            return await self._respond_streamed(request, upstream)
        if not json_body:
            raise UpstreamError(
                "the upstream answered a route that encrypts response fields with a non-JSON body",
                code="upstream_not_json",
            )
        encoding = upstream.headers.get("Content-Encoding", "identity").strip().lower()
        gzipped = encoding == "gzip" and route.allow_gzip
        if encoding not in ("", "identity") and not gzipped:
            raise UpstreamError(
                f"the upstream answered with Content-Encoding {encoding!r} on a route that "
                "transforms fields",
                code="upstream_encoding",
            )
        try:
            limit, what = route.max_body_size, "upstream response"
            body = upstream.take_body()  # None unless all of it has arrived
            if body is None:
                body = await forward.read_limited(upstream, limit, what=what)
            else:
                body = forward.within(body, limit, what=what)
            if gzipped:
                body = forward.gunzip_limited(body, limit, what=what)
        except RequestError as exc:
            if exc.status == 413:
                raise forward.ResponseTooLarge(exc.message) from None
            raise _upstream_body_error(exc) from None
        if route.response_decrypt:
            decide = self._decider(request, route)
            try:
                body, labels, outcomes = await self.fields.decrypt_body(
                    body, route, route.response_decrypt, context, decide=decide
                )
            except RequestError as exc:
                raise _upstream_body_error(exc) from None
            self._field_event("decrypt_fields", request, route, context, labels)
            rid = request[appkeys.REQUEST_ID]
            for event in decide.audit_events(request_id=rid, context=dict(context)):
                self.audit(event)  # one "reveal" event per policy outcome, naming the fields
            for label, outcome in outcomes:
                if outcome == "error":
                    self._field_event("reveal", request, route, context, [label], outcome=outcome)
        if route.tokens_response:
            body = await self._response_tokens(request, route, body, context)
        if route.response_encrypt:
            try:
                body, labels = await self.fields.encrypt_body(
                    body, route, route.response_encrypt, context
                )
            except RequestError as exc:
                raise _upstream_body_error(exc) from None
            self._field_event("encrypt_fields", request, route, context, labels)
        headers = forward.response_headers(
            upstream.headers,
            keep_length=False,
            decoded=True,
            request_id=request[appkeys.REQUEST_ID],
        )
        return web.Response(
            status=upstream.status, reason=upstream.reason, headers=headers, body=body
        )

    def _identify_caller(self, request: RequestView) -> None:
        if self.mtls and request.transport is not None:
            request[appkeys.PEER_CERT] = tls.peer_certificate(
                request.transport.get_extra_info("ssl_object")
            )
        request[appkeys.PRINCIPAL] = self._identify.call1("request", request)

    def _decider(self, request: RequestView, route: CompiledRoute) -> Decider:
        """Per-request policy decisions (cached per label); the purpose header is checked here."""
        return Decider(
            self.pm,
            request.get(appkeys.PRINCIPAL),
            route.label,
            route.key,
            purpose_of(request, self.settings),
            authorize=self._authorize,
        )


def _upstream_body_error(exc: RequestError) -> SidecryptError:
    """Broken JSON or a missing required field in a response is the upstream's fault: 502."""
    if isinstance(exc, AccessDenied):
        return exc
    return UpstreamError(f"the upstream response: {exc.message}", code="upstream_bad_body")


def _principal_id(request: RequestView) -> str | None:
    principal = request.get(appkeys.PRINCIPAL)
    return principal.id if principal is not None else None


def create_app(settings: Settings, pm: pluggy.PluginManager) -> web.Application:
    """The proxy app and, at ``app[appkeys.ADMIN]``, its admin app."""
    app = web.Application(
        client_max_size=settings.server.max_body_size,
        # Bodies pass through as sent: a gzip upload stays gzip (decoded only on allow_gzip routes).
        handler_args={"max_field_size": settings.server.max_header_size, "auto_decompress": False},
    )
    stores = build_stores(settings, pm)
    providers = build_providers(settings, pm, stores)
    limits = settings.data_keys
    keys = DataKeyService(
        providers,
        CacheLimits(
            max_age=limits.max_age,
            max_uses=limits.max_uses,
            max_bytes=limits.max_bytes,
            decrypt_entries=limits.decrypt_entries,
            decrypt_ttl=limits.decrypt_ttl,
            decrypt_concurrency=limits.decrypt_concurrency,
        ),
        audit=lambda event: pm.hook.sidecrypt_audit(event=event),
    )
    proxy = Proxy(settings, pm, keys)
    if settings.vault_store is not None:
        t = settings.tokens
        proxy.tokens = TokenFields(
            Vault(
                None,  # the store's table, once the store has started (_lifespan)
                keys,
                cache_entries=t.cache_entries,
                cache_ttl=t.cache_ttl,
                audit=lambda event: pm.hook.sidecrypt_audit(event=event),
            )
        )
        app[appkeys.VAULT] = proxy.tokens.vault
    app[appkeys.SETTINGS] = settings
    app[appkeys.PLUGIN_MANAGER] = pm
    app[appkeys.KEYS] = keys
    app[appkeys.STORES] = stores
    app[PROXY_KEY] = proxy
    app[appkeys.ADMIN] = admin.create_admin_app(app)
    app.cleanup_ctx.append(_lifespan)
    app[CATCH_ALL_KEY] = app.router.add_route("*", "/{tail:.*}", proxy.handle)
    app[appkeys.REQUEST_OBSERVERS] = proxy.observers
    app[appkeys.PROXY_GAUGES] = proxy.gauges
    pm.hook.sidecrypt_app(app=app, settings=settings)
    # The audit plugin installs a fast gate: refuse key use before it happens, not after.
    proxy.audit_gate = app.get(appkeys.AUDIT_GATE, proxy.audit_gate)
    return app


PROXY_KEY: web.AppKey[Proxy] = web.AppKey("sidecrypt.proxy_state")
CATCH_ALL_KEY: web.AppKey[web.AbstractRoute] = web.AppKey("sidecrypt.catch_all_route")


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    proxy = app[PROXY_KEY]
    settings = app[appkeys.SETTINGS]
    started = []
    stores = []
    try:
        for store in app[appkeys.STORES].values():  # before providers: branch keys live there
            await store.start()
            stores.append(store)
        if proxy.tokens is not None and settings.vault_store is not None:
            proxy.tokens.vault.table = vault_table(app[appkeys.STORES][settings.vault_store])
        for provider in proxy.keys.providers.values():
            await provider.start()
            started.append(provider)
        proxy.pool = UpstreamPool(settings.upstream, source=settings.source)
        yield
    finally:
        if proxy.pool is not None:
            await proxy.pool.close()
        for provider in started:
            try:
                await provider.close()
            except Exception:  # closing must not hide the shutdown of the others
                log.exception("closing key provider %s failed", provider.name)
        proxy.keys.clear()
        proxy.fields.esdk.clear()  # ESDK data keys cached beside the sc1 ones
        for store in stores:
            try:
                await store.close()
            except Exception:
                log.exception("closing store %s failed", store.name)
