"""The demo's page and its API: the console plays the client.

A person fills in a record; the console sends it over TLS (with the clerk's certificate) through
a tap to sidecrypt, reads what the legacy app stored straight from its SQLite, reads the record
back as each caller the demo ships, and sends the same request over plain HTTP through a second
tap. The page shows the three columns, both captures, and the audit trail with its verification.
Served on 127.0.0.1 only; static files come from the package (no build step, no CDN).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509

from ..audit_chain import verify_files
from .stack import CALLERS, FIELDS, WRITER, Caller, DemoStack

STATIC = Path(__file__).parent / "static"
STACK: web.AppKey[DemoStack] = web.AppKey("sidecrypt.demo.stack")
SESSIONS: web.AppKey[dict[str, aiohttp.ClientSession]] = web.AppKey("sidecrypt.demo.sessions")
LOCK: web.AppKey[asyncio.Lock] = web.AppKey("sidecrypt.demo.lock")
MAX_RECORD = 16 * 1024
MAX_ANSWER = 1 << 20
TIMEOUT = aiohttp.ClientTimeout(total=10)


def create_console(stack: DemoStack) -> web.Application:
    app = web.Application(client_max_size=MAX_RECORD)
    app[STACK] = stack
    app[LOCK] = asyncio.Lock()  # one exchange at a time: the taps' captures stay whole
    app.router.add_get("/", _index)
    app.router.add_get("/favicon.ico", _no_content)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/api/info", _info)
    app.router.add_post("/api/records", _submit)
    app.router.add_get("/api/audit", _audit)
    app.cleanup_ctx.append(_sessions)
    return app


async def _sessions(app: web.Application) -> Any:
    stack = app[STACK]
    sessions = {}
    for caller in CALLERS:
        sessions[caller.cn] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=_client_context(stack, caller), force_close=True),
            timeout=TIMEOUT,
        )
    sessions["plain"] = aiohttp.ClientSession(timeout=TIMEOUT)
    app[SESSIONS] = sessions
    yield
    for session in sessions.values():
        await session.close()


async def _no_content(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def _info(request: web.Request) -> web.Response:
    stack = request.app[STACK]
    return web.json_response(
        {
            "fields": FIELDS,
            "proxy": f"https://localhost:{stack.proxy_port}",
            "admin": f"http://127.0.0.1:{stack.admin_port}",
            "callers": [{"cn": c.cn, "role": c.role, "grants": c.grants} for c in CALLERS],
            "writer": {"cn": WRITER.cn, "role": WRITER.role},
        }
    )


async def _submit(request: web.Request) -> web.Response:
    try:
        record = await request.json()
    except (ValueError, UnicodeDecodeError):
        return web.json_response({"error": "send the record as a JSON object"}, status=400)
    if not isinstance(record, dict):
        return web.json_response({"error": "send the record as a JSON object"}, status=400)
    app = request.app
    stack, sessions = app[STACK], app[SESSIONS]
    async with app[LOCK]:
        stack.tls_tap.clear()
        status, created, tls = await _post_over_tls(stack, record)
        tls_bytes = bytes(stack.tls_tap.sent)
        stack.plain_tap.clear()
        plain_url = f"http://127.0.0.1:{stack.plain_tap.port}/users"
        async with sessions["plain"].post(plain_url, json=record) as resp:
            await resp.read()
        plain_bytes = bytes(stack.plain_tap.sent)
        if status != 201:
            return web.json_response({"error": "sidecrypt refused the record", "answer": created})
        record_id = int(created["id"])
        stored = stack.stored(record_id)
        views = [await _read_as(sessions[c.cn], stack, c, record_id) for c in CALLERS]
    return web.json_response(
        {
            "id": record_id,
            "sent": record,
            "tls": tls,
            "stored": json.loads(stored) if stored else None,
            "views": views,
            "wire": {
                "tls": {"bytes": len(tls_bytes), "hex": tls_bytes[:768].hex()},
                "plain": {"bytes": len(plain_bytes), "text": plain_bytes[:4096].decode("latin-1")},
            },
        }
    )


async def _read_as(
    session: aiohttp.ClientSession, stack: DemoStack, caller: Caller, record_id: int
) -> dict[str, Any]:
    url = f"https://127.0.0.1:{stack.proxy_port}/users/{record_id}"
    async with session.get(url) as resp:
        body = await resp.json(content_type=None)
        return {
            "cn": caller.cn,
            "role": caller.role,
            "grants": caller.grants,
            "status": resp.status,
            "body": body,
        }


async def _post_over_tls(stack: DemoStack, record: Any) -> tuple[int, Any, dict[str, Any]]:
    """The clerk's POST on a TLS connection of its own, through the tap: the page shows what
    that connection negotiated (an aiohttp session hands its connection back before the
    answer can be looked at)."""
    body = json.dumps(record).encode()
    head = (
        f"POST /users HTTP/1.1\r\nHost: localhost:{stack.proxy_port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    ctx = _client_context(stack, WRITER)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", stack.tls_tap.port, ssl=ctx, server_hostname="localhost"
        ),
        TIMEOUT.total,
    )
    try:
        tls = _tls_details(writer.get_extra_info("ssl_object"))
        writer.write(head + body)
        answer = await asyncio.wait_for(_read_to_end(reader), TIMEOUT.total)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 502
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = None
    return status, parsed, tls


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    """The whole answer (Connection: close), at most MAX_ANSWER bytes."""
    data = bytearray()
    while len(data) <= MAX_ANSWER and (chunk := await reader.read(65536)):
        data += chunk
    return bytes(data)


def _client_context(stack: DemoStack, caller: Caller) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(stack.certs["ca"]))
    ctx.load_cert_chain(stack.certs[f"client:{caller.cn}"], stack.certs[f"client_key:{caller.cn}"])
    return ctx


def _tls_details(sslobj: ssl.SSLObject | None) -> dict[str, Any]:
    """The negotiated version and cipher, and the certificate sidecrypt presented."""
    if sslobj is None:
        return {}
    der = sslobj.getpeercert(binary_form=True)
    if der is None:
        return {}
    cert = x509.load_der_x509_certificate(der)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in sans]
    except x509.ExtensionNotFound:
        names = []
    cipher = sslobj.cipher()
    return {
        "version": sslobj.version(),
        "cipher": cipher[0] if cipher else None,
        "certificate": {
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "names": names,
            "not_after": cert.not_valid_after_utc.isoformat(),
            "sha256": hashlib.sha256(der).hexdigest(),
        },
    }


async def _audit(request: web.Request) -> web.Response:
    stack = request.app[STACK]
    path = stack.audit_file
    lines = path.read_text().splitlines()[-50:] if path.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    result = verify_files([path], stack.audit_key) if path.exists() else None
    return web.json_response(
        {
            "records": records,
            "verify": {"ok": result.ok, "summary": str(result)} if result else None,
        }
    )
