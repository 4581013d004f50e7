"""The upstream side: header rules, request targets and body reading helpers."""

from __future__ import annotations

import asyncio
import functools
import zlib
from collections.abc import AsyncIterator
from typing import Protocol

from aiohttp import hdrs
from aiohttp.http import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from ..errors import RequestError, SidecryptError
from .incoming import RequestView

# RFC 9110 7.6.1 hop-by-hop fields, plus the non-standard ones proxies also drop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)


# Headers a framework or gateway may take as the request's real method or path, so the app would
# route it where sidecrypt did not look. Never forwarded, on any path. (X-Forwarded-* are all
# dropped below and only -For, -Proto and -Host set again: -Prefix, -Path, -Uri never pass.)
_STRIPPED = frozenset(
    {
        # Method overrides: ASP.NET Web API, Spring's HiddenHttpMethodFilter kin, express
        # method-override, Symfony (X-HTTP-Method-Override), OData/SharePoint (X-HTTP-Method).
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-method",  # nginx auth_request conventions pass the method in it
        # Rewrites: IIS URL Rewrite and Symfony/Zend/Laminas (X-Original-URL, X-Rewrite-URL),
        # nginx auth_request conventions (X-Original-URI), Envoy (X-Envoy-Original-Path, -URL),
        # others' spellings of the same idea.
        "x-original-url",
        "x-original-uri",
        "x-original-path",
        "x-original-prefix",
        "x-rewrite-url",
        "x-envoy-original-path",
        "x-envoy-original-url",
        # Prefixes and script names: Werkzeug ProxyFix, Spring ForwardedHeaderFilter and
        # ASP.NET Core (X-Forwarded-Prefix, dropped with all X-Forwarded-*), WSGI recipes.
        "x-forwarded-prefix",
        "x-forwarded-path",
        "x-forwarded-uri",
        "x-script-name",
        "script-name",  # gunicorn took a SCRIPT_NAME header as the script name
        "x-request-uri",
        # Framework-internal routing headers no client should set (Next.js).
        "x-matched-path",
        "x-invoke-path",
        "x-invoke-query",
        "x-middleware-rewrite",
        "x-middleware-subrequest",
    }
)


def _underscored(names: frozenset[str]) -> frozenset[str]:
    """``names`` with every "-" also spelled "_": CGI-style servers (Rack, PHP, WSGI) read a
    header ``X_HTTP_Method_Override`` as ``HTTP_X_HTTP_METHOD_OVERRIDE`` too."""
    out = set()
    for name in names:
        parts = name.split("-")
        for mask in range(1 << (len(parts) - 1)):
            spelled = parts[0]
            for i, part in enumerate(parts[1:]):
                spelled += ("_" if mask >> i & 1 else "-") + part
            out.add(spelled)
    return frozenset(out)


STRIPPED_REQUEST_HEADERS = _underscored(_STRIPPED)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    values = headers.getall(hdrs.CONNECTION, ())
    if not values:
        return frozenset()
    if len(values) == 1 and len(values[0]) <= 64:  # "keep-alive", "close": nearly every message
        return _tokens(values[0])
    return frozenset(t.strip().lower() for v in values for t in v.split(","))


@functools.lru_cache(maxsize=64)
def _tokens(value: str) -> frozenset[str]:
    return frozenset(t.strip().lower() for t in value.split(","))


@functools.lru_cache(maxsize=64)
def _skipped(drop: frozenset[str], keep_length: bool, identity_encoding: bool) -> frozenset[str]:
    """Lower-case names never copied upstream, worked out once per proxy and body treatment."""
    skip = set(HOP_BY_HOP) | {"host", "x-request-id"} | drop | STRIPPED_REQUEST_HEADERS
    if not keep_length:  # the body is replaced: its length and coding are the pool's to set
        skip |= {"content-length", "content-encoding"}
    if identity_encoding:  # replaced by "identity" below
        skip.add("accept-encoding")
    return frozenset(skip)


def request_headers(
    request: RequestView,
    *,
    upstream_host: str,
    preserve_host: bool,
    keep_length: bool,
    identity_encoding: bool = False,
    drop: frozenset[str] = frozenset(),
    request_id: str | None = None,
) -> list[tuple[str, str]]:
    """Headers for the upstream request: hop-by-hop dropped, X-Forwarded-* set, Host rewritten,
    X-Request-Id set to the request's id (the client's when valid, else sidecrypt's own).

    A plain list in the client's order: the upstream pool writes it as it is (and owns framing).
    """
    src = request.headers
    skip = _skipped(drop, keep_length, identity_encoding)
    extra = _connection_tokens(src)
    out: list[tuple[str, str]] = []
    prior: list[str] = []
    for name, value in src.items():
        lname = name.lower()
        if lname in skip or lname in extra:
            continue
        if lname.startswith("x-"):
            if lname.startswith("x-sidecrypt-"):  # sidecrypt's own namespace (identity headers)
                continue
            if lname.startswith("x-forwarded-"):
                if lname == "x-forwarded-for":
                    prior.append(value)
                continue
        out.append((name, value))
    host = src.get(hdrs.HOST, "")
    out.append(("Host", host if preserve_host and host else upstream_host))
    peer = request.remote or ""
    out.append(("X-Forwarded-For", ", ".join((*prior, peer)) if prior else peer))
    out.append(("X-Forwarded-Proto", "https" if request.secure else "http"))
    if host:
        out.append(("X-Forwarded-Host", host))
    if identity_encoding:
        out.append(("Accept-Encoding", "identity"))
    if request_id:
        out.append(("X-Request-Id", request_id))
    return out


def response_headers(
    headers: CIMultiDictProxy[str],
    *,
    keep_length: bool,
    decoded: bool = False,
    request_id: str | None = None,
) -> list[tuple[str, str]]:
    """Headers for the client; ``decoded``: the body is sent without its Content-Encoding;
    ``request_id`` replaces any X-Request-Id the upstream sent (one id per request).

    A plain list: aiohttp's response copies whatever it is given into its own multidict.
    """
    extra = _connection_tokens(headers)
    out: list[tuple[str, str]] = []
    for name, value in headers.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in extra:
            continue
        if request_id and lname == "x-request-id":
            continue
        if lname == "content-length" and not keep_length:
            continue
        if decoded and lname == "content-encoding":
            continue
        out.append((name, value))
    if request_id:
        out.append(("X-Request-Id", request_id))
    return out


def upstream_target(base_path: str, raw_path: str) -> str:
    """The origin-form target: the upstream's base path, then the client's raw path and query.

    Nothing is re-encoded, and the result is always a path: a relative reference such as
    ``//other-host/x`` or an absolute-form target cannot choose the host the proxy connects to
    (the pool connects to the configured origin only; :func:`check_path` refuses such targets).
    """
    if not raw_path.startswith("/"):
        raw_path = "/" + raw_path
    return base_path + raw_path


def check_path(request: RequestView) -> None:
    """Refuse paths the upstream may read differently from the route matcher.

    Dot segments and encoded slashes are how a request for ``/public/..%2Fusers`` would reach a
    route that must encrypt without matching it. A dot segment may carry path parameters
    (``/public/..;/users``: Tomcat, Jetty and Spring read ``/users``), a segment of parameters
    only is an empty one to them (``/;x/users`` is ``/users``), and a target has no fragment:
    ``#`` is refused outright.
    """
    target = request.raw_path
    if "#" in target:
        raise RequestError("a request target has no fragment (#)", code="ambiguous_path")
    raw = target.partition("?")[0]
    if not raw.startswith("/") or "//" in raw or "/;" in raw:
        # Absolute-form targets and empty segments: the upstream may read another host or path.
        raise RequestError(
            "the request target must be a path without empty segments", code="ambiguous_path"
        )
    escaped = "%" in raw
    if escaped or "\\" in raw:
        lowered = raw.lower()
        if "%2f" in lowered or "%5c" in lowered or "\\" in raw:
            raise RequestError("encoded slashes are not allowed in the path", code="ambiguous_path")
    if escaped or "." in raw:  # a dot segment may be escaped (%2e): look at the decoded path
        path = request.path
        segments = {segment.partition(";")[0] for segment in path.split("/")}
        if "." in segments or ".." in segments:
            raise RequestError("dot segments are not allowed in the path", code="ambiguous_path")
        if escaped and ("//" in path or "/;" in path):  # the same once decoded (%3b, %2f)
            raise RequestError(
                "the request target must be a path without empty segments", code="ambiguous_path"
            )


class Readable(Protocol):
    async def readany(self) -> bytes: ...


# What reading a client's body raises when the client breaks it: bad framing (the parser's own
# error, or aiohttp's RequestPayloadError around it), a short body, a reset.
BODY_ERRORS = (HttpProcessingError, RequestPayloadError, OSError)


def bad_body(exc: BaseException) -> RequestError:
    """A 400 naming the error's type only: its text may quote the client's bytes."""
    return RequestError(
        f"the request body could not be read ({type(exc).__name__})", code="bad_request_body"
    )


def too_large(what: str, limit: int) -> RequestError:
    return RequestError(
        f"{what} is larger than the {limit}-byte limit for this route",
        status=413,
        code="body_too_large",
    )


def within(body: bytes, limit: int, *, what: str) -> bytes:
    """``body`` (one that arrived whole), refused (413) past ``limit``."""
    if len(body) > limit:
        raise too_large(what, limit)
    return body


async def read_limited(stream: Readable, limit: int, *, what: str) -> bytes:
    """Read a whole body, refusing (413) as soon as it passes ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise too_large(what, limit)
        chunks.append(chunk)


async def iter_body(stream: Readable, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
    """A client's body as it arrives, for a streamed upload.

    ``idle_timeout`` bounds each wait for the next piece, not the whole body: a large upload that
    keeps moving takes as long as it needs, one that stalls is refused (408). A body the client
    breaks (reset, bad chunk framing, short of its Content-Length) becomes a 400: either way a
    RequestError, answered as JSON, never aiohttp's bare 500.
    """
    while True:
        try:
            if idle_timeout is None:
                chunk = await stream.readany()
            else:
                async with asyncio.timeout(idle_timeout):
                    chunk = await stream.readany()
        except TimeoutError:  # before OSError: TimeoutError is one
            raise RequestError(
                "the request body did not arrive in time", status=408, code="body_timeout"
            ) from None
        except BODY_ERRORS as exc:
            raise bad_body(exc) from None
        if not chunk:
            return
        yield chunk


def gunzip_limited(data: bytes, limit: int, *, what: str) -> bytes:
    """Decode one gzip member, refusing (413) output past ``limit``: no decompression bombs."""
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = decoder.decompress(data, limit + 1)
    except zlib.error:
        raise RequestError(f"{what} is not valid gzip", code="bad_gzip") from None
    if len(out) > limit:
        raise RequestError(
            f"{what} decompresses to more than the {limit}-byte limit for this route",
            status=413,
            code="body_too_large",
        )
    if not decoder.eof or decoder.unused_data:
        raise RequestError(
            f"{what} is truncated or holds more than one gzip member", code="bad_gzip"
        )
    return out


class ResponseTooLarge(SidecryptError):
    status = 502
    code = "upstream_response_too_large"
