"""The upstream side: one pooled client session, header rules, and body streaming helpers."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..config import Upstream
from ..errors import RequestError, SidecryptError
from . import tls

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

STREAM_CHUNK = 64 * 1024


def make_session(upstream: Upstream, *, source: str | None = None) -> aiohttp.ClientSession:
    """One session for the app's life: pooled keep-alive connections, no cookies, no magic."""
    ctx = tls.upstream_context(upstream, source=source)
    connector = aiohttp.TCPConnector(
        limit=upstream.pool_size,
        ssl=ctx if ctx is not None else True,
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=upstream.connect_timeout, sock_read=upstream.read_timeout
        ),
        trust_env=False,
        max_line_size=16 * 1024,
        max_field_size=64 * 1024,
    )


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(","))


def request_headers(
    request: web.Request,
    *,
    upstream_host: str,
    preserve_host: bool,
    keep_length: bool,
    identity_encoding: bool = False,
    drop: frozenset[str] = frozenset(),
) -> CIMultiDict[str]:
    """Headers for the upstream request: hop-by-hop dropped, X-Forwarded-* set, Host rewritten."""
    src = request.headers
    extra = _connection_tokens(src)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in src.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in extra or lname == "host" or lname in drop:
            continue
        if lname.startswith("x-sidecrypt-"):  # sidecrypt's own namespace (identity headers)
            continue
        if not keep_length and lname in ("content-length", "content-encoding"):  # body replaced
            continue
        if lname.startswith("x-forwarded-") and lname != "x-forwarded-for":
            continue
        if identity_encoding and lname == "accept-encoding":
            continue
        out.add(name, value)
    host = src.get("Host", "")
    out["Host"] = host if preserve_host and host else upstream_host
    peer = request.remote or ""
    prior = out.popall("X-Forwarded-For", ())
    out["X-Forwarded-For"] = ", ".join((*prior, peer)) if prior else peer
    out["X-Forwarded-Proto"] = "https" if request.secure else "http"
    if host:
        out["X-Forwarded-Host"] = host
    if identity_encoding:
        out["Accept-Encoding"] = "identity"
    return out


def response_headers(
    headers: CIMultiDictProxy[str], *, keep_length: bool, decoded: bool = False
) -> CIMultiDict[str]:
    """Headers for the client; ``decoded``: the body is sent without its Content-Encoding."""
    extra = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in extra:
            continue
        if lname == "content-length" and not keep_length:
            continue
        if decoded and lname == "content-encoding":
            continue
        out.add(name, value)
    return out


def upstream_url(base: URL, raw_path: str) -> URL:
    """Append the client's raw path+query to the upstream base without re-encoding anything.

    Built, never joined: a relative reference such as ``//other-host/x`` or an absolute-form
    target must not be able to choose the host the proxy connects to.
    """
    path, sep, query = raw_path.partition("?")
    if not path.startswith("/"):
        path = "/" + path
    return URL.build(
        scheme=base.scheme,
        authority=base.raw_authority,
        path=base.raw_path.rstrip("/") + path,
        query_string=query if sep else "",
        encoded=True,
    )


def check_path(request: web.Request) -> None:
    """Refuse paths the upstream may read differently from the route matcher.

    Dot segments and encoded slashes are how a request for ``/public/..%2Fusers`` would reach a
    route that must encrypt without matching it.
    """
    raw = request.raw_path.split("?", 1)[0]
    if not raw.startswith("/") or "//" in raw:
        # Absolute-form targets and empty segments: the upstream may read another host or path.
        raise RequestError(
            "the request target must be a path without empty segments", code="ambiguous_path"
        )
    lowered = raw.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in raw:
        raise RequestError("encoded slashes are not allowed in the path", code="ambiguous_path")
    path = request.path
    if "/./" in path or "/../" in path or path.endswith(("/.", "/..")):
        raise RequestError("dot segments are not allowed in the path", code="ambiguous_path")


async def read_limited(stream: aiohttp.StreamReader, limit: int, *, what: str) -> bytes:
    """Read a whole body, refusing (413) as soon as it passes ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise RequestError(
                f"{what} is larger than the {limit}-byte limit for this route",
                status=413,
                code="body_too_large",
            )
        chunks.append(chunk)


async def iter_body(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    while True:
        chunk = await stream.readany()
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
