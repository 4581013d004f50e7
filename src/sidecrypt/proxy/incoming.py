"""What the proxy handler and the ``sidecrypt_identify`` hook see of a request.

Two engines serve client connections (``server.engine``): aiohttp's own, which hands the
handler a ``web.Request``, and the lean one (proxy/front.py), which hands it an
:class:`Incoming`. :class:`RequestView` is the part both offer; code that takes a request is
typed with it, so it works with either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from aiohttp import hdrs, web
from aiohttp._cookie_helpers import parse_cookie_header  # what web.Request.cookies uses
from aiohttp.helpers import HeadersMixin
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, RawRequestMessage
from aiohttp.streams import EmptyStreamReader, StreamReader
from multidict import CIMultiDictProxy, MultiDictProxy, MultiMapping
from yarl import URL

if TYPE_CHECKING:
    from aiohttp.abc import AbstractStreamWriter

_T = TypeVar("_T")


class RequestView(Protocol):
    """The request attributes sidecrypt and its hooks rely on (a subset of ``web.Request``)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def raw_path(self) -> str: ...
    @property
    def rel_url(self) -> URL: ...
    @property
    def query(self) -> MultiMapping[str]: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content(self) -> StreamReader: ...
    @property
    def body_exists(self) -> bool: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content_type(self) -> str: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def secure(self) -> bool: ...
    async def read(self) -> bytes: ...
    def __getitem__(self, key: web.RequestKey[_T]) -> _T: ...
    def __setitem__(self, key: web.RequestKey[_T], value: _T) -> None: ...
    def __contains__(self, key: object) -> bool: ...
    @overload
    def get(self, key: web.RequestKey[_T], /) -> _T | None: ...
    @overload
    def get(self, key: web.RequestKey[_T], default: _T, /) -> _T: ...


class Connection(Protocol):
    """What :class:`Incoming` needs of the connection it arrived on (front.Connection)."""

    transport: asyncio.Transport | None
    peername: Any
    secure: bool

    def payload_writer(self) -> AbstractStreamWriter: ...
    def closing(self) -> bool: ...


class Incoming(HeadersMixin):
    """One request on a lean-engine connection: the parsed message, its body stream, and
    per-request state. Cheap to make: everything beyond the message is computed on use."""

    __slots__ = ("_conn", "_message", "_payload", "_state", "_writer", "app")

    def __init__(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        conn: Connection,
        app: web.Application | None = None,
    ) -> None:
        self._message = message
        self._headers = message.headers
        self._payload = payload
        self._conn = conn
        self._state: dict[Any, Any] = {}
        self._writer: AbstractStreamWriter | None = None
        self.app = app

    def __repr__(self) -> str:  # the method and path only: no query, headers or body
        path = self._message.url.path.encode("ascii", "backslashreplace").decode("ascii")
        return f"<Incoming {self._message.method} {path}>"

    # -- the message ----------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self._message.method

    @property
    def version(self) -> HttpVersion:
        return self._message.version

    @property
    def raw_path(self) -> str:
        return self._message.path

    @property
    def rel_url(self) -> URL:
        return self._message.url

    @property
    def path(self) -> str:
        return self._message.url.path

    @property
    def query(self) -> MultiDictProxy[str]:
        return self._message.url.query

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._message.headers

    @property
    def keep_alive(self) -> bool:
        return not self._message.should_close

    # -- more of web.Request, for plugins (not in RequestView) -----------------------------------

    @property
    def host(self) -> str:
        return self._message.headers.get(hdrs.HOST, "")

    @property
    def query_string(self) -> str:
        return self._message.url.query_string

    @property
    def path_qs(self) -> str:
        return str(self._message.url)

    @property
    def url(self) -> URL:
        return URL.build(scheme=self.scheme, authority=self.host).join(self._message.url)

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return self._message.raw_headers

    @property
    def cookies(self) -> Mapping[str, str]:
        parsed = parse_cookie_header(self._message.headers.get(hdrs.COOKIE, ""))
        return MappingProxyType({name: morsel.value for name, morsel in parsed})

    # -- the body -------------------------------------------------------------------------------

    @property
    def content(self) -> StreamReader:
        return self._payload

    @property
    def body_exists(self) -> bool:
        return type(self._payload) is not EmptyStreamReader

    async def read(self) -> bytes:
        return await self._payload.read()

    # -- the connection -------------------------------------------------------------------------

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    @property
    def remote(self) -> str | None:
        peer = self._conn.peername
        if isinstance(peer, (list, tuple)):
            return str(peer[0])
        return None if peer is None else str(peer)

    @property
    def secure(self) -> bool:
        return self._conn.secure

    @property
    def scheme(self) -> str:
        return "https" if self._conn.secure else "http"

    # -- per-request state, as web.Request's mapping --------------------------------------------

    def __getitem__(self, key: web.RequestKey[_T]) -> _T:
        return self._state[key]  # type: ignore[no-any-return]

    def __setitem__(self, key: web.RequestKey[_T], value: _T) -> None:
        self._state[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._state

    @overload
    def get(self, key: web.RequestKey[_T], /) -> _T | None: ...
    @overload
    def get(self, key: web.RequestKey[_T], default: _T, /) -> _T: ...
    def get(self, key: Any, default: Any = None, /) -> Any:
        return self._state.get(key, default)

    # -- what aiohttp's StreamResponse.prepare() asks of a request ------------------------------

    @property
    def _payload_writer(self) -> AbstractStreamWriter:
        if self._writer is None:
            self._writer = self._conn.payload_writer()
        return self._writer

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        """Between aiohttp's header rules and the write: its own Server header does not go out
        (the one-write path never adds it), and a last answer says it is the last."""
        headers = response.headers
        if headers.get(hdrs.SERVER) == SERVER_SOFTWARE:
            del headers[hdrs.SERVER]
        if self._conn.closing() and hdrs.CONNECTION not in headers:
            headers[hdrs.CONNECTION] = "close"


def base_request(request: RequestView) -> web.BaseRequest:
    """``request`` for aiohttp's ``StreamResponse.prepare()``: a ``web.Request`` already is one,
    and an :class:`Incoming` offers what prepare() reads (tests/proxy/test_front.py pins it)."""
    return request  # type: ignore[return-value]
