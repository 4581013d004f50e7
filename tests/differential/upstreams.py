"""The upstreams the corpus runs against: three Python parsers and Node's express.

Each records, per request, the raw bytes that arrived (method, target, headers, body) and what
the app would have STORED: the record its parser and binder build. The Python apps route the
way frameworks do (case-insensitive, trailing slash tolerant, percent-decoded, NFKC, matrix
parameters stripped, rewrite headers and method overrides honoured) so a record says which
route the app believes it served.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

NODE_DIR = Path(__file__).parent / "node"

# The fields a binder maps into (Go structs, ASP.NET models): what the app would store.
MODEL = {"ssn": None, "kyc_id": None, "name": None, "card": {"number": None}, "contacts": None}


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    stored: Any = None  # the parsed record (None when the body did not parse)
    route: str = ""


@dataclass
class Recorder:
    kind: str
    url: str = ""
    seen: list[Received] = field(default_factory=list)
    refresh: Callable[[], None] = lambda: None

    def take(self) -> list[Received]:
        self.refresh()
        seen, self.seen = self.seen, []
        return seen


# -- key folding, as the binders do it ------------------------------------------------------------


def fold_go(key: str) -> str:
    """Go encoding/json: case-insensitive with Unicode simple folding (long s -> s, Kelvin sign -> k)."""
    return key.casefold()


def fold_lenient(key: str) -> str:
    """Binders that also NFKC-normalise, trim whitespace and drop NULs (C strings, ASP.NET)."""
    return unicodedata.normalize("NFKC", key.replace("\x00", "")).strip().casefold()


def bind(doc: Any, model: Any, fold: Callable[[str], str]) -> Any:
    """Map a document onto MODEL the way a case-insensitive binder does (last match wins)."""
    if isinstance(model, dict) and isinstance(doc, dict):
        out: dict[str, Any] = {}
        for key, value in doc.items():
            for name, sub in model.items():
                if fold(key) == fold(name):
                    out[name] = bind(value, sub, fold) if sub is not None else value
        return out
    if isinstance(doc, list):
        return [bind(item, model, fold) for item in doc]
    return doc


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


PARSERS: dict[str, Callable[[str], Any]] = {
    "python-last-wins": json.loads,
    "python-first-wins": lambda text: json.loads(text, object_pairs_hook=_first_wins),
    "go-fold-binder": lambda text: bind(json.loads(text), MODEL, fold_go),
    "nfkc-trim-binder": lambda text: bind(
        json.loads(text, object_pairs_hook=_first_wins), MODEL, fold_lenient
    ),
}


def app_route(method: str, target: str, headers: list[tuple[str, str]]) -> str:
    """The route a lenient framework serves: overrides and rewrite headers honoured."""
    lower = {k.lower(): v for k, v in headers}
    for name in ("x-original-url", "x-rewrite-url", "x-original-uri", "x-forwarded-path"):
        if name in lower:
            target = lower[name]
    path, _, query = target.partition("?")
    path = lower.get("x-forwarded-prefix", "") + path
    for _ in range(3):  # double encoding: frameworks behind a decoding gateway
        path = urllib.parse.unquote(path)
    path = path.replace("\\", "/").replace("\u200b", "").replace("\ufeff", "")
    path = unicodedata.normalize("NFKC", path)
    segments = [s.split(";", 1)[0].strip().rstrip(".") for s in path.split("/")]
    resolved: list[str] = []
    for seg in segments:
        if seg == "..":
            if resolved:
                resolved.pop()
        elif seg and seg != ".":
            resolved.append(seg.lower())
    override = lower.get("x-http-method-override") or lower.get("x-http-method") or ""
    override = override or lower.get("x-method-override", "")
    override = override or urllib.parse.parse_qs(query).get("_method", [""])[0]
    return f"{(override or method).upper()} /" + "/".join(resolved)


def parse_body(parse: Callable[[str], Any], headers: list[tuple[str, str]], body: bytes) -> Any:
    """What the app stores: JSON (any content type), urlencoded or multipart fields."""
    ctype = next((v for k, v in headers if k.lower() == "content-type"), "").lower()
    encoding = next((v for k, v in headers if k.lower() == "content-encoding"), "").lower()
    with contextlib.suppress(Exception):
        if encoding == "gzip":
            import gzip

            body = gzip.decompress(body)
        elif encoding == "deflate":
            import zlib

            body = zlib.decompress(body)
    if ctype.startswith("application/x-www-form-urlencoded"):
        return urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    if ctype.startswith("multipart/form-data"):
        import email.parser
        import email.policy

        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body
        )
        parts = msg.iter_parts() if msg.is_multipart() else iter(())
        return {
            str(p.get_param("name", header="content-disposition")): p.get_content() for p in parts
        }
    for codec in ("utf-8", "utf-16", "utf-32"):
        with contextlib.suppress(Exception):
            return parse(body.decode(codec))
    return None


@contextlib.asynccontextmanager
async def python_upstream(kind: str, aiohttp_server: Any) -> AsyncIterator[Recorder]:
    rec = Recorder(kind)
    parse = PARSERS[kind]

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = list(request.raw_headers)
        decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        target = request.raw_path
        stored = None
        with contextlib.suppress(Exception):  # a body the app cannot parse stores nothing
            stored = parse_body(parse, decoded, body)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
        rec.seen.append(
            Received(
                request.method,
                target,
                decoded,
                body,
                stored={"body": stored, "query": query},
                route=app_route(request.method, target, decoded),
            )
        )
        return web.json_response({"ok": True})

    @web.middleware
    async def everything(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handle(request)  # before routing: a target no route matches is recorded too

    app = web.Application(client_max_size=1 << 24, middlewares=[everything])
    srv = await aiohttp_server(app, host="127.0.0.1")
    rec.url = f"http://127.0.0.1:{srv.port}"
    yield rec


@contextlib.asynccontextmanager
async def express_upstream(tmp: Path) -> AsyncIterator[Recorder]:
    """node server.js, from tests/differential/node (npm ci there; .ci/run does)."""
    log = tmp / "express.jsonl"
    log.write_text("")
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_DIR / "server.js"),
        str(log),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=NODE_DIR,
        env={**os.environ, "NODE_ENV": "production"},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        if not line:
            assert proc.stderr is not None
            err = await asyncio.wait_for(proc.stderr.read(), timeout=5)
            raise RuntimeError(f"express did not start: {err.decode(errors='replace')[-2000:]}")
        rec = Recorder("express", url=f"http://127.0.0.1:{json.loads(line)['port']}")
        offset = 0

        def refresh() -> None:
            nonlocal offset
            data = log.read_bytes()
            for raw in data[offset:].splitlines():
                r = json.loads(raw)
                names = r["headers"][0::2]
                values = r["headers"][1::2]
                body = base64.b64decode(r["rawBody"]) if r["rawBody"] else b""
                files = [base64.b64decode(f["data"]) for f in r["files"]]
                rec.seen.append(
                    Received(
                        r["method"],
                        r["url"],
                        list(zip(names, values, strict=True)),
                        body + b"".join(files),
                        stored={"body": r["body"], "query": r["query"]},
                        route=f"{r['method']} {r['path']}",
                    )
                )
            offset = len(data)

        rec.refresh = refresh
        yield rec
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
