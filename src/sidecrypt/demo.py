"""``sidecrypt demo``: a legacy app that stores what it gets, with sidecrypt in front of it.

Everything runs in one process on 127.0.0.1 with generated certificates and a fresh keyring in
a temporary directory: the reader sees what the client sent, what the app stored in SQLite
(ciphertext for the configured fields) and what the client reads back through sidecrypt.
``--keep-running`` takes free ports and prints them; SIGTERM or Ctrl-C stops it, and the
temporary directory (keyring and certificates included) is removed on every way out.
``--app-only ADDRESS`` serves the legacy app alone, for the README's quick start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import ssl
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from . import config
from .certs import write_dev_certs
from .keyring import create_key
from .proxy import server

FIELDS = ["$.ssn", "$.card.number", "$.contacts[*].phone"]
# A tokenized field beside the encrypted ones: the app stores a valid address of the same
# length, the same one for the same value, so its own lookup by email keeps working.
EMAIL = {"format": "email", "consistent": True}
TOKENIZED = [{"path": "$.email", **EMAIL}]
DETOKENIZED = [{"path": "$.email", **EMAIL}, {"path": "$[*].email", **EMAIL}]

SAMPLES: list[dict[str, Any]] = [
    {
        "name": "Ada Lovelace",
        "email": "ada.lovelace@example.org",
        "ssn": "123-45-6789",
        "card": {"number": "4111 1111 1111 1111", "expiry": "12/29"},
        "contacts": [{"kind": "home", "phone": "+44 20 7946 0018"}],
    },
    {
        "name": "Alan Turing",
        "email": "alan.turing@example.org",
        "ssn": 987654321,
        "card": {"number": "5500 0000 0000 0004", "expiry": "01/30"},
        "contacts": [
            {"kind": "work", "phone": "+44 161 496 0000"},
            {"kind": "cell", "phone": None},
        ],
    },
]


def legacy_app(db: sqlite3.Connection) -> web.Application:
    """The app sidecrypt protects: it stores and returns JSON exactly as it receives it."""
    db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, doc TEXT NOT NULL)")

    async def create(request: web.Request) -> web.Response:
        doc = await request.text()
        cur = db.execute("INSERT INTO users (doc) VALUES (?)", (doc,))
        db.commit()
        return web.json_response({"id": cur.lastrowid, **json.loads(doc)}, status=201)

    async def read(request: web.Request) -> web.Response:
        row = db.execute(
            "SELECT doc FROM users WHERE id = ?", (int(request.match_info["id"]),)
        ).fetchone()
        if row is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.Response(text=row[0], content_type="application/json")

    async def listing(request: web.Request) -> web.Response:
        docs = [json.loads(r[0]) for r in db.execute("SELECT doc FROM users ORDER BY id")]
        if "email" in request.query:  # the app's own search: equality on what it stored
            docs = [d for d in docs if d.get("email") == request.query["email"]]
        return web.json_response(docs)

    app = web.Application()
    app.router.add_post("/users", create)
    app.router.add_get("/users", listing)
    app.router.add_get("/users/{id}", read)
    return app


def demo_settings(workdir: Path, upstream: str, listen: str, admin: str) -> config.Settings:
    certs = write_dev_certs(workdir / "certs")
    create_key(workdir / "keyring.json", "app")
    decrypt: list[Any] = [*FIELDS]
    decrypt += [{"path": "$[*]" + f[1:], "bind_as": f} for f in FIELDS]
    raw = {
        "mode": "server-side",
        "listen": {
            "address": listen,
            "tls": {"cert": str(certs["server_cert"]), "key": str(certs["server_key"])},
        },
        "admin": {"address": admin},
        "upstream": {"url": upstream},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json"}},
        "stores": {"vault": {"type": "sqlite", "path": "vault.db"}},
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/users"},
                "key": "app",
                "request": {"encrypt": FIELDS, "tokenize": TOKENIZED},
            },
            {
                "match": {"methods": ["GET"], "path": "/users/**"},
                "key": "app",
                "lookup": {"query": {"email": EMAIL}},
                "response": {"decrypt": decrypt, "detokenize": DETOKENIZED},
            },
            {
                "match": {"methods": ["GET"], "path": "/users"},
                "key": "app",
                "lookup": {"query": {"email": EMAIL}},
                "response": {"decrypt": decrypt, "detokenize": DETOKENIZED},
            },
        ],
    }
    return config.parse(raw, file="<demo>", base_dir=workdir)


def _show(title: str, doc: Any) -> str:
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    return f"--- {title} ---\n" + "\n".join(
        line[:107] + "..." if len(line) > 110 else line  # keep the start of a token visible
        for line in text.splitlines()
    )


def _stop_on_signals() -> asyncio.Event:
    """SIGTERM and SIGINT end the demo through its ``finally`` blocks (files removed), exit 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal() -> None:
        stop.set()
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    return stop


async def _demo(keep_running: bool) -> None:
    _stop_on_signals()
    with tempfile.TemporaryDirectory(prefix="sidecrypt-demo-") as tmp:
        workdir = Path(tmp)
        db = sqlite3.connect(workdir / "legacy.db")
        app_runner = web.AppRunner(legacy_app(db), access_log=None)
        await app_runner.setup()
        await web.TCPSite(app_runner, "127.0.0.1", 0).start()
        upstream = f"http://127.0.0.1:{app_runner.addresses[0][1]}"
        settings = demo_settings(workdir, upstream, "127.0.0.1:0", "127.0.0.1:0")
        running, shutdown = await server.start(settings)
        port, admin_port = running.addresses()[0][1], running.addresses()[1][1]
        base = f"https://localhost:{port}"
        ctx = ssl.create_default_context(cafile=str(workdir / "certs" / "ca.pem"))
        try:
            print(
                f"legacy app (stores what it receives): {upstream}, "
                f"SQLite at {workdir / 'legacy.db'}"
            )
            print(
                f"sidecrypt (server-side, TLS):          {base}  encrypts {', '.join(FIELDS)}; "
                "tokenizes $.email (same shape, same token for the same value)\n"
            )
            async with aiohttp.ClientSession() as http:
                for sample in SAMPLES:
                    async with http.post(f"{base}/users", json=sample, ssl=ctx) as resp:
                        resp.raise_for_status()
                        created = await resp.json()
                    row = db.execute(
                        "SELECT doc FROM users WHERE id = ?", (created["id"],)
                    ).fetchone()
                    async with http.get(f"{base}/users/{created['id']}", ssl=ctx) as resp:
                        read_back = await resp.json()
                    print(_show("1. client sent (over TLS)", sample))
                    print(_show("2. legacy app stored in SQLite (at rest)", json.loads(row[0])))
                    print(_show("3. client reads back through sidecrypt", read_back))
                    same = read_back == sample
                    print(
                        f"=== round trip {'identical, types included' if same else 'DIFFERS'} ===\n"
                    )
                    if not same:
                        raise SystemExit(1)
                wanted = SAMPLES[1]["email"]
                async with http.get(f"{base}/users", params={"email": wanted}, ssl=ctx) as resp:
                    found = await resp.json()
                print(
                    _show(f"4. the app's own lookup by email ({wanted}) through sidecrypt", found)
                )
                ok = [d.get("name") for d in found] == [SAMPLES[1]["name"]]
                print(f"=== lookup {'found the record' if ok else 'FAILED'} ===\n")
                if not ok:
                    raise SystemExit(1)
            if keep_running:
                print(
                    f"sidecrypt port {port}, admin port {admin_port}, app port "
                    f"{app_runner.addresses[0][1]}; files in {workdir} (removed on exit)\n"
                    "sidecrypt stays up (Ctrl-C or SIGTERM to stop). Try:\n"
                    f"  curl --cacert {workdir}/certs/ca.pem {base}/users\n"
                    f"  curl --cacert {workdir}/certs/ca.pem -H 'Content-Type: application/json' "
                    f'-d \'{{"name":"x","ssn":"000-00-0000"}}\' {base}/users\n'
                    f"  curl {upstream}/users        # the app itself: ciphertext\n"
                    f"  curl http://127.0.0.1:{admin_port}/readyz",
                    flush=True,
                )
                await asyncio.Event().wait()  # until a signal cancels this task
        finally:
            await shutdown()
            await app_runner.cleanup()
            db.close()


async def _app_only(address: str) -> None:
    """The legacy app alone (SQLite in memory), until SIGTERM or Ctrl-C."""
    _stop_on_signals()
    host, port = config.parse_address(address)
    db = sqlite3.connect(":memory:")
    runner = web.AppRunner(legacy_app(db), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"legacy app listening on http://{host}:{runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        db.close()


def run_demo(*, keep_running: bool = False, app_only: str | None = None) -> int:
    main = _demo(keep_running) if app_only is None else _app_only(app_only)
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        server.run_loop(main)
    return 0
