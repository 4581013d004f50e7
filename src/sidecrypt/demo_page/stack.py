"""The browser demo's stack: the legacy app, sidecrypt in front of it with mTLS callers and a
reveal policy, an audit trail, and the taps that capture what crosses the wire.

Everything listens on 127.0.0.1 on free ports and lives in one temporary directory that
:meth:`DemoStack.close` removes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import config
from ..certs import write_dev_certs
from ..keyring import create_key
from ..proxy import server
from .tap import Tap

FIELDS = ["$.ssn", "$.card.number", "$.contacts[*].phone"]
AUDIT_KEY_ENV = "SIDECRYPT_DEMO_AUDIT_KEY"


@dataclass(frozen=True)
class Caller:
    """A client certificate the demo ships, and what the policy gives it."""

    cn: str
    role: str
    grants: str  # what the page says this caller should see


WRITER = Caller("clerk-1", "clerk", "writes records")
CALLERS = (
    Caller("billing-1", "billing", "reveal: plaintext"),
    Caller("support-1", "support", "mask: last 4 characters"),
    Caller("analytics-1", "analytics", "ciphertext: the stored token"),
    Caller("intern-1", "intern", "deny: 403"),
)


def demo_raw_config(certs: dict[str, Path], upstream: str) -> dict[str, Any]:
    """sidecrypt's config for the page: mTLS identities by CN, one rule per role."""
    roles = [{"cn": c.cn, "roles": [c.role]} for c in (WRITER, *CALLERS)]
    return {
        "mode": "server-side",
        "listen": {
            "address": "127.0.0.1:0",
            "tls": {
                "cert": str(certs["server_cert"]),
                "key": str(certs["server_key"]),
                "client_ca": str(certs["ca"]),
            },
        },
        "admin": {"address": "127.0.0.1:0"},
        "upstream": {"url": upstream},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json"}},
        # A checkpoint after 1 s idle: the page's live verification sees a sealed chain.
        "audit": {
            "file": "audit.jsonl",
            "hmac_key": {"env": AUDIT_KEY_ENV},
            "checkpoint_interval": 1,
        },
        "identity": {"mtls": {"id_from": ["cn"], "map": roles, "require_mapping": True}},
        "policy": {
            "rules": [
                {
                    "key": "app",
                    "route": "/users/*",
                    "fields": FIELDS,
                    "roles": ["mtls:billing"],
                    "mask_for": {"roles": ["mtls:support"]},
                    "ciphertext_for": {"roles": ["mtls:analytics"]},
                    "otherwise": "deny",
                }
            ]
        },
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/users"},
                "key": "app",
                "request": {"encrypt": FIELDS},
            },
            {
                "match": {"methods": ["GET"], "path": "/users/*"},
                "key": "app",
                "response": {"decrypt": FIELDS},
            },
        ],
    }


@dataclass
class DemoStack:
    workdir: Path
    db: sqlite3.Connection
    certs: dict[str, Path]
    proxy_port: int
    admin_port: int
    tls_tap: Tap  # client -> sidecrypt: TLS records
    plain_tap: Tap  # the same request over plain HTTP, to a sink
    audit_key: bytes
    _closers: list[Any] = field(default_factory=list)

    @property
    def audit_file(self) -> Path:
        return self.workdir / "audit.jsonl"

    def stored(self, record_id: int) -> str | None:
        row = self.db.execute("SELECT doc FROM users WHERE id = ?", (record_id,)).fetchone()
        return None if row is None else str(row[0])

    async def close(self) -> None:
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                await close()
        self.db.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.environ.pop(AUDIT_KEY_ENV, None)


async def start_stack() -> DemoStack:
    """Start it all; on any failure, what was started is stopped and the directory removed."""
    from ..demo import legacy_app  # the same app as the terminal demo

    workdir = Path(tempfile.mkdtemp(prefix="sidecrypt-demo-"))
    closers: list[Any] = []
    db = sqlite3.connect(workdir / "legacy.db")
    try:
        certs = write_dev_certs(workdir / "certs", clients=tuple(c.cn for c in (WRITER, *CALLERS)))
        create_key(workdir / "keyring.json", "app")
        audit_key = secrets.token_urlsafe(32)
        os.environ[AUDIT_KEY_ENV] = audit_key
        app_port = await _serve(legacy_app(db), closers)
        sink_port = await _serve(_sink_app(), closers)
        settings = config.parse(
            demo_raw_config(certs, f"http://127.0.0.1:{app_port}"),
            file="<demo>",
            base_dir=workdir,
        )
        running, shutdown = await server.start(settings)
        closers.append(shutdown)
        proxy_port, admin_port = (a[1] for a in running.addresses()[:2])
        tls_tap, plain_tap = Tap("127.0.0.1", proxy_port), Tap("127.0.0.1", sink_port)
        for tap in (tls_tap, plain_tap):
            await tap.start()
            closers.append(tap.close)
    except BaseException:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()
        db.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return DemoStack(
        workdir, db, certs, proxy_port, admin_port, tls_tap, plain_tap, audit_key.encode(), closers
    )


async def _serve(app: web.Application, closers: list[Any]) -> int:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    closers.append(runner.cleanup)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port: int = runner.addresses[0][1]
    return port


def _sink_app() -> web.Application:
    """Stands for 'the same request over plain HTTP': reads it, stores nothing, answers 204."""

    async def swallow(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", swallow)
    return app
