"""The bench's world: tools found or installed, certificates, keyring, bodies, configs."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = {"tenant": "acme", "app": "bench"}
ENCRYPTED = ("ssn", "card_number", "phone")  # 3 of the 10 string fields
ENC_PATH = "/records/1"  # matches the field-encrypting route
TOK_PATH = "/tokens/1"  # matches the tokenizing route: the same 3 fields as consistent tokens
TOKENIZED = (  # (field, format options): what the tokenizing route does to ENCRYPTED's fields
    ("ssn", "format: ssn"),
    ("card_number", "format: card"),
    ("phone", "format: alnum"),
)
PASS_PATH = "/plain/1"  # matches no route: pass-through

PORTS = {
    "upstream": 18080,
    "nginx-tls-1": 18441,
    "nginx-tls-2": 18442,
    "bare-1": 18451,
    "bare-2": 18452,
    "sidecrypt-1": 18461,
    "sidecrypt-2": 18462,
    "sidecrypt-aiohttp-1": 18463,
}


def find_tools() -> tuple[str, str]:
    """nginx and wrk from PATH (or /usr/sbin); apt-get installs them when running as root."""

    def which() -> tuple[str | None, str | None]:
        path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
        return shutil.which("nginx", path=path), shutil.which("wrk", path=path)

    nginx, wrk = which()
    if nginx and wrk:
        return nginx, wrk
    if os.geteuid() != 0:
        sys.exit(
            "bench: needs nginx and wrk (Debian: sudo apt-get install -y nginx wrk); "
            f"missing: {' '.join(n for n, p in (('nginx', nginx), ('wrk', wrk)) if not p)}"
        )
    print("bench: installing nginx and wrk with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx", "wrk"], check=True, env=env)
    nginx, wrk = which()
    if not (nginx and wrk):
        sys.exit("bench: apt-get did not provide nginx and wrk")
    return nginx, wrk


def body_doc() -> dict[str, str]:
    """A 1 KB JSON object of 10 string fields."""
    doc = {
        "id": "rec-000000000001",
        "name": "Ada Lovelace-Byron",
        "email": "ada.lovelace@example.com",
        "ssn": "078-05-1120",
        "card_number": "4111111111111111",
        "phone": "+44 20 7946 0958",
        "address": "12 St James Square, London SW1Y 4JH, United Kingdom",
        "notes": "",
        "status": "active",
        "created": "2026-11-28T12:00:00Z",
    }
    size = len(orjson.dumps(doc))
    doc["notes"] = "n" * (1024 - size)
    assert len(orjson.dumps(doc)) == 1024
    return doc


@dataclass
class World:
    dir: Path
    nginx: str
    wrk: str
    cert: Path
    key: Path
    body: bytes  # plaintext request body
    enc_body: bytes  # the same document with the 3 fields encrypted: the upstream's answer
    tok_body: bytes  # the same document with the 3 fields tokenized: the answer on TOK_PATH
    sidecrypt_configs: dict[int, Path]  # by workers; 0: one worker on the aiohttp engine


def _sidecrypt() -> list[str]:
    return [sys.executable, "-m", "sidecrypt.cli"]


def sidecrypt_config(d: Path, workers: int, port: int, engine: str = "lean") -> Path:
    path = d / f"sidecrypt-w{workers}-{engine}.yaml"
    path.write_text(
        f"""mode: server-side
listen:
  address: 127.0.0.1:{port}
  tls: {{cert: server.pem, key: server-key.pem}}
admin: {{address: null}}
server: {{workers: {workers}, access_log: false, engine: {engine}}}
upstream: {{url: "http://127.0.0.1:{PORTS["upstream"]}"}}
keys:
  app: {{provider: local, keyring: keyring.json}}
log: {{level: warning}}
stores: {{vault: {{type: sqlite, path: vault.db}}}}
tokens: {{store: vault}}
routes:
  - match: {{methods: [POST], path: "/tokens/**"}}
    key: app
    context: {{tenant: "header:X-Tenant", app: "bench"}}
    request:
      tokenize: [{", ".join(f"{{path: $.{f}, {o}, consistent: true}}" for f, o in TOKENIZED)}]
    response:
      detokenize: [{", ".join(f"{{path: $.{f}, {o}, consistent: true}}" for f, o in TOKENIZED)}]
  - match: {{methods: [POST], path: "/records/**"}}
    key: app
    context: {{tenant: "header:X-Tenant", app: "bench"}}
    request:
      encrypt: [{", ".join("$." + f for f in ENCRYPTED)}]
    response:
      decrypt: [{", ".join("$." + f for f in ENCRYPTED)}]
"""
    )
    return path


def prepare(d: Path) -> World:
    nginx, wrk = find_tools()
    d.mkdir(parents=True, exist_ok=True)
    run = lambda *a: subprocess.run([*_sidecrypt(), *a], check=True, capture_output=True)  # noqa: E731
    run("certs", "dev", str(d))
    keyring = d / "keyring.json"
    if not keyring.exists():
        run("keys", "create", "--keyring", str(keyring), "app")
    keyring.chmod(0o600)
    configs = {w: sidecrypt_config(d, w, PORTS[f"sidecrypt-{w}"]) for w in (1, 2)}
    # One worker on aiohttp's own server engine, to show what the lean engine changes.
    configs[0] = sidecrypt_config(d, 1, PORTS["sidecrypt-aiohttp-1"], engine="aiohttp")
    body = orjson.dumps(body_doc())
    enc_body = asyncio.run(_encrypt(configs[1], body))
    if b"$" in enc_body or b"'" in enc_body or b"\\" in enc_body:
        raise RuntimeError("encrypted body cannot be quoted in nginx.conf")
    tok_body = asyncio.run(_tokenize(configs[1], body))
    return World(
        d, nginx, wrk, d / "server.pem", d / "server-key.pem", body, enc_body, tok_body, configs
    )


async def _tokenize(config: Path, body: bytes) -> bytes:
    """The body as the tokenizing route sends it upstream (consistent tokens: the proxies,
    sharing the vault file, make the same ones)."""
    from sidecrypt import config as cfg
    from sidecrypt.keys import DataKeyService, canonical_context
    from sidecrypt.plugin_manager import build_providers, build_stores, make_plugin_manager
    from sidecrypt.proxy.routes import Router
    from sidecrypt.proxy.tokenize import TokenFields
    from sidecrypt.tokens.table import vault_table
    from sidecrypt.tokens.vault import Vault

    settings = cfg.load(config)
    pm = make_plugin_manager()
    store = build_stores(settings, pm)["vault"]
    providers = build_providers(settings, pm)
    await store.start()
    for p in providers.values():
        await p.start()
    try:
        route = Router(settings.routes, default_max_body=1 << 20).match("POST", TOK_PATH)
        assert route is not None and route[0].tokens is not None
        fields = TokenFields(Vault(vault_table(store), DataKeyService(providers)))
        ctx = canonical_context(CONTEXT)
        out, _ = await fields.tokenize_body(body, "app", route[0].tokens.request_tokenize, ctx)
        return out
    finally:
        for p in providers.values():
            await p.close()
        await store.close()


async def _encrypt(config: Path, body: bytes) -> bytes:
    from sidecrypt import config as cfg
    from sidecrypt.offline import transform_document

    settings = cfg.load(config)
    return await transform_document(
        settings, body, direction="encrypt", route=f"POST {ENC_PATH}", context=CONTEXT
    )


def nginx_upstream_conf(w: World) -> Path:
    """The upstream of every proxied config: nginx answering every request with a fixed body.

    The body is the 1 KB document with its 3 fields already encrypted (what an app that stores
    ciphertext returns), so the encrypting route has real response decryption to do, and the
    pass-through route forwards the same bytes.
    """
    return _nginx_conf(
        w,
        "upstream",
        1,
        f"""server {{
    listen 127.0.0.1:{PORTS["upstream"]} backlog=4096;
    keepalive_requests 1000000;
    location / {{
        default_type application/json;
        return 200 '{w.enc_body.decode()}';
    }}
    location /tokens/ {{
        default_type application/json;
        return 200 '{w.tok_body.decode()}';
    }}
}}""",
    )


def nginx_tls_conf(w: World, workers: int) -> Path:
    name = f"nginx-tls-{workers}"
    return _nginx_conf(
        w,
        name,
        workers,
        f"""upstream app {{
    server 127.0.0.1:{PORTS["upstream"]};
    keepalive 128;
}}
server {{
    listen 127.0.0.1:{PORTS[name]} ssl backlog=4096;
    ssl_certificate {w.cert};
    ssl_certificate_key {w.key};
    ssl_protocols TLSv1.2 TLSv1.3;
    keepalive_requests 1000000;
    location / {{
        proxy_pass http://app;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $proxy_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto https;
        proxy_buffering on;
    }}
}}""",
    )


def _nginx_conf(w: World, name: str, workers: int, server: str) -> Path:
    prefix = w.dir / name
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""{user}
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    {server}
}}
"""
    )
    return conf
