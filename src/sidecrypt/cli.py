"""sidecrypt: run the proxy, check configs, manage keys, transform documents offline.

Exit codes: 0 ok, 1 operation failed, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, config, logs
from .errors import ConfigError, SidecryptError

log = logging.getLogger("sidecrypt")

Handler = Callable[[argparse.Namespace], int]


LEVELS = ("debug", "info", "warning", "error")


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and exit code 2, for every verb."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a verb's parser must not overwrite a value given before the verb with None.
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default=argparse.SUPPRESS,
        help="debug, info, warning or error (default: the config's log.level, or info)",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "text"),
        default=argparse.SUPPRESS,
        help="json lines or readable text (default: the config's log.format, or json)",
    )


def _pair(text: str) -> tuple[str, str]:
    """NAME=VALUE (argparse type): a malformed one is a usage error, exit 2."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"want NAME=VALUE, not {text!r}")
    return name.strip(), value


def _out(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# -- verbs ---------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .proxy import server

    settings = config.load(args.config)
    _setup_logs(args, settings)
    _preflight(settings)
    return server.run(settings)


def _preflight(settings: config.Settings) -> list[str]:
    """Everything that can fail before serving: certificates, key providers, plugin configs."""
    from .plugin_manager import build_providers, build_stores, make_plugin_manager
    from .proxy import tls

    if settings.listen.tls is not None:
        tls.server_context(settings.listen.tls, source=settings.source)
    tls.upstream_context(settings.upstream, source=settings.source)
    from .plugins.local_keys import LocalKeyProvider

    pm = make_plugin_manager()
    build_stores(settings, pm)
    notes: list[str] = []
    for name, provider in build_providers(settings, pm).items():
        if isinstance(provider, LocalKeyProvider) and provider.options.master_key is None:
            notes.append(f"keys.{name}: {UNPROTECTED}")
    for batch in pm.hook.sidecrypt_check_config(settings=settings):
        notes.extend(batch)
    return notes


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = config.load(args.file)
    notes = _preflight(settings)

    async def start_providers() -> None:
        from .plugin_manager import build_providers, make_plugin_manager

        for provider in build_providers(settings, make_plugin_manager()).values():
            try:
                await provider.start()
            finally:
                await provider.close()

    if not args.offline:
        asyncio.run(start_providers())
    print(f"{args.file}: ok ({len(settings.routes)} routes, {len(settings.keys)} keys)")
    for note in notes:
        print(f"note: {note}")
    return 0


def cmd_certs_dev(args: argparse.Namespace) -> int:
    from .certs import write_dev_certs

    paths = write_dev_certs(Path(args.dir))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo's output is the story; logs only when something goes wrong (or when asked).
    logs.setup(getattr(args, "log_level", None) or "error", getattr(args, "log_format", "text"))
    if args.app_only is not None:
        try:
            config.parse_address(args.app_only)
        except ValueError:
            raise ConfigError(f"--app-only wants host:port, not {args.app_only!r}") from None
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    wanted = args.keep_running or args.app_only is not None
    if args.browser or (interactive and not args.no_browser and not wanted):
        from .demo_page.serve import run_page

        return run_page(args.port)
    from .demo import run_demo

    return run_demo(keep_running=args.keep_running, app_only=args.app_only)


def cmd_keys(args: argparse.Namespace) -> int:
    from . import keyring as local_keys

    if args.keys_verb == "list" and getattr(args, "config", None):
        return _list_configured_keys(args.config)
    if args.keys_verb in ("rotate", "forget") and getattr(args, "config", None):
        return _branch_keys_admin(args)
    if args.keys_verb == "rotate" and not args.keyring:
        raise ConfigError("keys rotate needs --keyring FILE or --config FILE")
    master = config.SecretRef(env=args.master_key_env).resolve() if args.master_key_env else None
    if args.keys_verb in ("create", "rotate"):
        if args.keys_verb == "create":
            info = local_keys.create_key(
                Path(args.keyring), args.name, master=master, kind=args.kind
            )
        else:
            info = local_keys.rotate_key(Path(args.keyring), args.name, master=master)
        _out(info)
        if master is None and args.keys_verb == "create":
            print(f"sidecrypt: note: {UNPROTECTED}", file=sys.stderr)
        if args.audit_config:
            return _audit_key_admin(args.audit_config, f"key_{args.keys_verb}", info)
    else:
        _out(local_keys.list_keys(Path(args.keyring), master=master))
    return 0


def _branch_keys_admin(args: argparse.Namespace) -> int:
    """``keys rotate|forget --config``: branch keys of configured keys (branch_admin.py)."""
    from . import branch_admin
    from .plugin_manager import make_plugin_manager
    from .plugins.audit import record_events

    settings = config.load(args.config)
    if args.keys_verb == "rotate":
        done = asyncio.run(branch_admin.rotate(settings, args.name, args.branch))
    else:
        done = asyncio.run(branch_admin.forget(settings, args.branch, args.key))
    _out(done)
    try:
        found = branch_admin.events(f"branch_key_{args.keys_verb}", done)
        asyncio.run(record_events(settings, make_plugin_manager(), found))
    except SidecryptError as exc:
        print(
            f"sidecrypt: done, but the audit trail did not record it: {exc.message}",
            file=sys.stderr,
        )
        return 1
    return 0


UNPROTECTED = (
    "the local keyring is not protected at rest (no master key): whoever can read the file "
    "has the keys; protect it with a master key (keys create --master-key-env VAR, and "
    "master_key in the key's config) or use a KMS key: see docs/operations.md, Keys"
)


def _audit_key_admin(path: str, action: str, info: dict[str, Any]) -> int:
    """Record a CLI key administration (who: the OS user) in a config's audit trail."""
    import getpass

    from .events import AuditEvent
    from .plugin_manager import make_plugin_manager
    from .plugins.audit import record_events

    settings = config.load(path)
    event = AuditEvent(
        action,
        key=str(info["name"]),
        provider="local",
        key_version=int(info["version"]),
        principal=f"os:{getpass.getuser()}",
    )
    try:
        asyncio.run(record_events(settings, make_plugin_manager(), [event]))
    except SidecryptError as exc:
        print(
            f"sidecrypt: the key changed but the audit trail did not record it: {exc.message}",
            file=sys.stderr,
        )
        return 1
    return 0


def _list_configured_keys(path: str) -> int:
    """``keys list --config``: every configured key through its provider, never key bytes.

    local: the keyring's metadata for that key; kms: DescribeKey + rotation status. A key that
    cannot be listed gets an ``error`` entry and the exit code is 1.
    """
    from .keyring import list_keys
    from .plugin_manager import build_providers, make_plugin_manager
    from .plugins.local_keys import LocalKeyProvider

    settings = config.load(path)

    async def one(name: str, provider: Any) -> dict[str, Any]:
        if isinstance(provider, LocalKeyProvider):
            found = [k for k in list_keys(provider.path) if k["name"] == provider.key_name]
            if not found:
                raise ConfigError(f"no key named {provider.key_name!r}", file=str(provider.path))
            return {**found[0], "name": name, "provider": "local", "key": provider.key_name}
        if provider.type_name == "kms":
            from .plugins.aws_kms import kms_key_status

            return await kms_key_status(provider.options, name)
        return dict(provider.describe())

    async def all_keys() -> list[dict[str, Any]]:
        out = []
        for name, provider in build_providers(settings, make_plugin_manager()).items():
            try:
                out.append(await one(name, provider))
            except SidecryptError as exc:
                out.append({"name": name, "provider": provider.type_name, "error": exc.message})
        return out

    listed = asyncio.run(all_keys())
    _out(listed)
    return 1 if any("error" in k for k in listed) else 0


def _read_input(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror}") from None


def cmd_transform(args: argparse.Namespace) -> int:
    from .offline import transform_document, with_format

    source = _read_input(args.input)
    settings = with_format(config.load(args.config), args.key, args.format)
    out = asyncio.run(
        transform_document(
            settings,
            source,
            direction=args.verb,
            route=args.route,
            selectors=tuple(args.field or ()),
            key=args.key,
            context=dict(args.context or ()),
            headers=dict(args.header or ()),
            query=dict(args.query or ()),
        )
    )
    sys.stdout.buffer.write(out + b"\n")
    return 0


def cmd_rewrap(args: argparse.Namespace) -> int:
    from .offline import rewrap_documents, with_format

    source = _read_input(args.input)
    settings = with_format(config.load(args.config), args.to_key, args.format)
    docs = [line for line in source.splitlines() if line.strip()] if args.jsonl else [source]
    outs, moved = asyncio.run(
        rewrap_documents(
            settings,
            docs,
            selectors=tuple(args.field or ()),
            to_key=args.to_key,
            progress=_progress_bar(len(docs)) if args.jsonl else None,
            route=args.route,
            context=dict(args.context or ()),
            headers=dict(args.header or ()),
            query=dict(args.query or ()),
        )
    )
    for out in outs:
        sys.stdout.buffer.write(out + b"\n")
    counts: dict[str, int] = {}
    for _, key, version in moved:
        counts[f"{key}:{version}"] = counts.get(f"{key}:{version}", 0) + 1
    # What protected the input: provider, key, version and, under a hierarchy, branch id.
    print(json.dumps({"protected_by": _protected_by(docs)}), file=sys.stderr)
    print(json.dumps({"rewrapped": len(moved), "from": counts}), file=sys.stderr)
    return 0


def _progress_bar(total: int, width: int = 30) -> Callable[[int], None]:
    """A progress bar on stderr (a line per 10% when stderr is not a terminal)."""
    tty = sys.stderr.isatty()
    step = max(total // 10, 1)

    def show(done: int) -> None:
        if tty:
            filled = width * done // max(total, 1)
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\rrewrap [{bar}] {done}/{total}" + ("\n" if done == total else ""))
            sys.stderr.flush()
        elif done % step == 0 or done == total:
            print(f"rewrap: {done}/{total} documents", file=sys.stderr)

    return show


def _protected_by(docs: list[bytes]) -> dict[str, int]:
    """sc1 tokens in JSON documents by ``provider key:version[ branch=ID]`` (no decryption)."""
    from .envelope import is_envelope, loads_json, parse

    counts: dict[str, int] = {}
    stack: list[Any] = [loads_json(doc) for doc in docs]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif is_envelope(node):
            try:
                env = parse(node)
            except SidecryptError:
                continue
            label = f"{env.provider} {env.key_name}:{env.key_version}"
            if env.provider.endswith(".bk"):
                label += f" branch={env.wrapped[1:17].hex()}"
            counts[label] = counts.get(label, 0) + 1
    return counts


def cmd_store_migrate(args: argparse.Namespace) -> int:
    """Create or migrate the schema of every configured store (or those named)."""
    from .plugin_manager import build_stores, make_plugin_manager

    settings = config.load(args.config)
    stores = build_stores(settings, make_plugin_manager())
    unknown = sorted(set(args.store or ()) - set(stores))
    if unknown:
        raise ConfigError(f"no store named {unknown[0]!r}", file=settings.source, path="stores")

    async def migrate_all() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, store in stores.items():
            if args.store and name not in args.store:
                continue
            try:
                done = await store.migrate()
            finally:
                await store.close()
            out[name] = {f: {"from": a, "to": b} for f, (a, b) in done.items()}
        return out

    _out(asyncio.run(migrate_all()))
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    """The token vault: init (schema and roots), rewrap, stats, forget --context."""
    from .offline_tokens import run as run_tokens

    settings = config.load(args.config)
    context = dict(kv.split("=", 1) for kv in getattr(args, "context", None) or ())
    _out(asyncio.run(run_tokens(settings, args.tokens_verb, context=context)))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from .audit_chain import verify_trails

    key = config.SecretRef(env=args.key_env).resolve()
    results = verify_trails(args.files, key)
    if len(results) == 1:
        print(str(results[0][1]))
    else:
        for name, result in results:
            print(f"{name}: {result}")
        bad = sum(not r.ok for _, r in results)
        print(
            f"{len(results)} trails, each verified on its own chain (one per worker or file set): "
            + ("all OK" if not bad else f"{bad} FAILED")
        )
    return 0 if all(r.ok for _, r in results) else 1


# -- parser --------------------------------------------------------------------------------------


def _route_flags(p: argparse.ArgumentParser) -> None:
    """--route and what feeds its encryption context, as the proxy takes it from a request."""
    p.add_argument(
        "--route",
        help="use this route's rules and context, e.g. 'POST /records/1?tenant=t1': path "
        "and query feed its path: and query: context entries",
    )
    p.add_argument(
        "--context",
        action="append",
        type=_pair,
        help="NAME=VALUE (repeatable): with --field the whole context; with --route the "
        "value of the route's context entry NAME",
    )
    p.add_argument(
        "--header",
        action="append",
        type=_pair,
        help="NAME=VALUE (repeatable): a request header, for header: context entries",
    )
    p.add_argument(
        "--query",
        action="append",
        type=_pair,
        help="NAME=VALUE (repeatable): a query parameter, for query: context entries",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sidecrypt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sidecrypt {__version__}")
    _common(parser)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", help="what to do")

    def verb(name: str, fn: Handler, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        p.set_defaults(fn=fn)
        return p

    p = verb("run", cmd_run, "run the proxy")
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p = verb("check-config", cmd_check_config, "validate a config, its certificates and keys")
    p.add_argument("file", help="YAML config file")
    p.add_argument("--offline", action="store_true", help="do not contact key providers")
    p = verb("demo", cmd_demo, "run a self-contained demo: legacy app + sidecrypt in front of it")
    p.add_argument(
        "--keep-running", action="store_true", help="stay up for curl (free ports, printed)"
    )
    p.add_argument(
        "--app-only",
        metavar="HOST:PORT",
        default=None,
        help="serve only the demo's legacy app (stores what it gets) there, e.g. 127.0.0.1:8080",
    )
    p.add_argument(
        "--browser",
        action="store_true",
        help="serve the demo page even when not run from a terminal (the default from one)",
    )
    p.add_argument(
        "--no-browser", action="store_true", help="print the terminal version instead of the page"
    )
    p.add_argument(
        "--port", type=int, default=0, help="the page's port on 127.0.0.1 (default: a free one)"
    )

    certs = verb("certs", lambda a: 2, "certificate tooling")
    csub = certs.add_subparsers(dest="certs_verb", required=True, metavar="VERB", help="what to do")
    p = csub.add_parser("dev", help="write a dev CA, server and client certificates")
    _common(p)
    p.add_argument("dir", help="directory to write ca.pem, server.pem, client.pem and keys to")
    p.set_defaults(fn=cmd_certs_dev)

    keys = verb("keys", cmd_keys, "manage a local keyring (never prints key bytes)")
    ksub = keys.add_subparsers(dest="keys_verb", required=True, metavar="VERB", help="what to do")
    for name, help_ in (("create", "create a key"), ("rotate", "add a new key version")):
        p = ksub.add_parser(name, help=help_)
        _common(p)
        p.add_argument(
            "--keyring",
            required=name == "create",
            help="the keyring file (created if missing)",
        )
        if name == "rotate":
            p.add_argument("--config", "-c", help="rotate the branch key of a configured key")
            p.add_argument("--branch", help="with --config: only this branch, e.g. tenant=acme")
        p.add_argument("--master-key-env", default=None, help="env var holding the master key")
        p.add_argument("name", help="the key's name inside the keyring")
        if name == "create":
            p.add_argument(
                "--kind",
                choices=("aes256", "rsa3072", "p256"),
                default="aes256",
                help="aes256 (fields), or rsa3072/p256 (a public key clients encrypt to)",
            )
        p.add_argument(
            "--audit-config",
            default=None,
            help="record this key administration in the audit trail of this config",
        )
        p.set_defaults(fn=cmd_keys)
    p = ksub.add_parser("forget", help="destroy a branch's keys (crypto-shredding)")
    _common(p)
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("--branch", required=True, help="NAME=VALUE, e.g. tenant=acme")
    p.add_argument("--key", help="only this configured key")
    p.set_defaults(fn=cmd_keys)
    p = ksub.add_parser("list", help="list keys, versions and states")
    _common(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--keyring", help="a local keyring file")
    where.add_argument("--config", "-c", help="every key a config names, through its provider")
    p.add_argument("--master-key-env", default=None, help="env var holding the master key")
    p.set_defaults(fn=cmd_keys)

    for name in ("encrypt", "decrypt"):
        p = verb(name, cmd_transform, f"{name} fields of a JSON document offline")
        p.add_argument("--config", "-c", required=True, help="YAML config file")
        p.add_argument("input", nargs="?", default="-", help="JSON file, or - for stdin")
        p.add_argument("--field", action="append", help="a selector (repeatable)")
        p.add_argument("--key", help="key name (with --field)")
        _route_flags(p)
        p.add_argument("--format", choices=("sc1", "esdk"), help="override the key's format")

    p = verb("rewrap", cmd_rewrap, "re-encrypt stored tokens under a key's newest version")
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("input", nargs="?", default="-", help="JSON file, or - for stdin")
    p.add_argument("--field", action="append", help="a selector (repeatable)")
    p.add_argument("--to-key", required=True, help="the configured key to re-encrypt under")
    _route_flags(p)
    p.add_argument("--format", choices=("sc1", "esdk"), help="write as sc1 tokens or ESDK messages")
    p.add_argument("--jsonl", action="store_true", help="one document per line (progress bar)")

    store = verb("store", lambda a: 2, "shared stores (branch keys, token vault)")
    ssub = store.add_subparsers(dest="store_verb", required=True, metavar="VERB", help="what to do")
    p = ssub.add_parser("migrate", help="create or migrate the stores' schema")
    _common(p)
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("--store", action="append", help="only this store (repeatable)")
    p.set_defaults(fn=cmd_store_migrate)

    tokens = verb("tokens", lambda a: 2, "the token vault")
    tsub = tokens.add_subparsers(
        dest="tokens_verb", required=True, metavar="VERB", help="what to do"
    )
    for name, help_ in (
        ("init", "create the vault's schema and each tokenizing key's root"),
        ("rewrap", "re-seal vault entries under each key's newest version (tokens unchanged)"),
        ("stats", "entries per key version, and the store's health"),
        ("forget", "delete one context's entries: its tokens stop resolving"),
    ):
        p = tsub.add_parser(name, help=help_)
        _common(p)
        p.add_argument("--config", "-c", required=True, help="YAML config file")
        if name == "forget":
            p.add_argument("--context", action="append", required=True, help="NAME=VALUE")
        p.set_defaults(fn=cmd_tokens)

    audit = verb("audit", lambda a: 2, "audit trail tools")
    asub = audit.add_subparsers(dest="audit_verb", required=True, metavar="VERB", help="what to do")
    p = asub.add_parser("verify", help="verify the HMAC chain of audit files")
    _common(p)
    p.add_argument("files", nargs="+", help="audit files; each is its own chain (one per worker)")
    p.add_argument("--key-env", required=True, help="env var holding the audit HMAC key")
    p.set_defaults(fn=cmd_audit_verify)
    return parser


def _setup_logs(args: argparse.Namespace, settings: config.Settings | None = None) -> None:
    level = getattr(args, "log_level", None) or (settings.log.level if settings else "info")
    fmt = getattr(args, "log_format", None) or (settings.log.format if settings else "json")
    logs.setup(level, fmt)
    args.effective_log_format = fmt


def _fatal(args: argparse.Namespace, exc: SidecryptError) -> None:
    """A fatal error: one JSON record when logs are JSON (run's default), and a line for people."""
    fmt = getattr(args, "log_format", None)
    if fmt == "json" or (fmt is None and args.verb == "run"):
        if getattr(args, "effective_log_format", None) != "json":
            logs.setup("error", "json")
        log.critical("sidecrypt cannot continue", extra={"error": exc.message, "code": exc.code})
    print(f"sidecrypt: {exc.message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logs(args)
    try:
        code: int = args.fn(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is handled below
    except ConfigError as exc:
        _fatal(args, exc)
        return 2
    except SidecryptError as exc:
        _fatal(args, exc)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (| head): quiet, as the Python docs advise (signal module notes);
        # stdout goes to devnull so the interpreter's own flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:  # a file or directory the verb needs: a line, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        _fatal(
            args, SidecryptError(f"{exc.strerror or type(exc).__name__}{where}", code="os_error")
        )
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
