"""Shared fixtures: trustme certificates, a recording upstream on a real socket, a running proxy,
moto_server for KMS, a real PostgreSQL, and ``make_store`` (each test on sqlite and postgresql)."""

from __future__ import annotations

import os
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from kms_server import DUMMY_ENV, KmsServer
from postgres_server import PostgresServer, find_bin
from sidecrypt import config
from sidecrypt.plugin_manager import build_stores, make_plugin_manager
from sidecrypt.proxy import server
from sidecrypt.stores import Store


@dataclass
class Certs:
    ca: trustme.CA
    dir: Path
    ca_file: Path
    server_cert: Path
    server_key: Path

    def client_context(self, *, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if client is not None:
            client.configure_cert(ctx)
        return ctx

    def issue_client(self, common_name: str, *sans: str) -> trustme.LeafCert:
        return self.ca.issue_cert(
            *(sans or (f"{common_name}.clients.test",)), common_name=common_name
        )


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_cert = directory / "server.pem"
    server_key = directory / "server-key.pem"
    server_cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(server_key))
    return Certs(ca, directory, ca_file, server_cert, server_key)


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Upstream:
    """A real HTTP app on 127.0.0.1 that records every request it receives."""

    url: str
    seen: list[Seen] = field(default_factory=list)
    app: web.Application | None = None

    def all_bytes(self) -> bytes:
        return b"\n".join(s.body + repr(s.headers).encode() + s.path_qs.encode() for s in self.seen)


UpstreamHandler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


async def _echo(request: web.Request, body: bytes) -> web.StreamResponse:
    ctype = request.content_type if body else "application/octet-stream"
    return web.Response(body=body, content_type=ctype)


@pytest.fixture
async def upstream_factory(
    aiohttp_server: Any,
) -> Callable[..., Awaitable[Upstream]]:
    async def make(handler: UpstreamHandler = _echo, **server_kwargs: Any) -> Upstream:
        up = Upstream(url="")

        async def record(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            up.seen.append(
                Seen(request.method, request.path_qs, list(request.headers.items()), body)
            )
            return await handler(request, body)

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", record)
        srv = await aiohttp_server(app, host="127.0.0.1", **server_kwargs)
        up.url = f"http://127.0.0.1:{srv.port}"
        up.app = app
        return up

    return make


@pytest.fixture
async def upstream(upstream_factory: Callable[..., Awaitable[Upstream]]) -> Upstream:
    return await upstream_factory()


@dataclass
class RunningProxy:
    url: str
    admin_url: str | None
    settings: config.Settings
    running: server.Running


@pytest.fixture
def proxy_engine() -> str | None:
    """The ``server.engine`` proxies get unless their config names one (None: the default).

    tests/proxy/conftest.py runs its tests once per engine.
    """
    return None


@pytest.fixture
async def proxy_factory(
    certs: Certs, proxy_engine: str | None
) -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    """Start sidecrypt for real (sockets, TLS) from a config dict; stops them all at the end."""
    stops: list[Callable[[], Awaitable[None]]] = []

    async def make(
        raw: dict[str, Any],
        *,
        tls: bool = True,
        plugins: tuple[object, ...] = (),
        base_dir: Path | None = None,
    ) -> RunningProxy:
        raw = dict(raw)
        listen = dict(raw.get("listen", {}))
        listen.setdefault("address", "127.0.0.1:0")
        if tls:
            listen.setdefault("tls", {"cert": str(certs.server_cert), "key": str(certs.server_key)})
        raw["listen"] = listen
        raw.setdefault("admin", {"address": "127.0.0.1:0"})
        if proxy_engine is not None:
            raw["server"] = {"engine": proxy_engine, **raw.get("server", {})}
        settings = config.parse(raw, file="test.yaml", base_dir=base_dir or certs.dir)
        running, shutdown = await server.start(settings, extra_plugins=plugins)
        stops.append(shutdown)
        addrs = running.addresses()
        scheme = "https" if tls else "http"
        url = f"{scheme}://localhost:{addrs[0][1]}" if tls else f"http://127.0.0.1:{addrs[0][1]}"
        admin_url = f"http://127.0.0.1:{addrs[1][1]}" if len(addrs) > 1 else None
        return RunningProxy(url, admin_url, settings, running)

    yield make
    for stop in reversed(stops):
        await stop()


# -- AWS KMS: a real moto_server and dummy credentials (tests/kms_server.py) --------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[KmsServer]:
    """One moto_server per test module: tests stop, pause and restart it, so modules don't share."""
    with KmsServer() as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials from the environment; no host AWS_* settings, shared files or metadata."""
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    for var, value in DUMMY_ENV.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL cluster for the session (tests/postgres_server.py). Missing binaries
    fail the test in CI (``CI`` set) and skip it, saying why, elsewhere."""
    bindir = find_bin()
    if bindir is None:
        reason = "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with PostgresServer(bindir) as server:
        yield server


# -- stores: the same tests on sqlite and on the session's PostgreSQL -------------------------

MakeStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_block(
    store_kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """The ``stores.<name>`` config block for this backend (a fresh database or file)."""
    if store_kind == "sqlite":
        return {"type": "sqlite", "path": "store.db"}
    pg = request.getfixturevalue("postgres")
    dsn = pg.create_database(f"t_{uuid.uuid4().hex[:16]}")
    monkeypatch.setenv("SIDECRYPT_TEST_DSN", dsn)
    return {"type": "postgresql", "dsn": {"env": "SIDECRYPT_TEST_DSN"}}


@pytest.fixture
async def make_store(store_block: dict[str, Any], tmp_path: Path) -> AsyncIterator[MakeStore]:
    """``await make_store(migrate=True, start=True, **options)``: a store on the same file or
    database each call (so two calls are two sidecars sharing it); closed at the end."""
    created: list[Store] = []

    async def make(*, migrate: bool = True, start: bool = True, **options: Any) -> Store:
        raw = {
            "upstream": {"url": "http://127.0.0.1:9"},
            "stores": {"main": {**store_block, **options}},
        }
        settings = config.parse(raw, base_dir=tmp_path)
        store = build_stores(settings, make_plugin_manager(entry_points=False))["main"]
        created.append(store)
        if migrate:
            await store.migrate()
        if start:
            await store.start()
        return store

    yield make
    for store in created:
        await store.close()
