"""YAML config -> frozen, validated settings.

Every error names the file and the dotted path of the bad setting (``sidecrypt.yaml:
upstream.url: not a valid URL``) and never echoes a value, since values may be secrets.
Relative paths in the file are resolved against the directory the file is in.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL

from .errors import ConfigError
from .plugins.identity import IdentityConfig
from .plugins.policy_model import PolicyConfig
from .selectors import SelectorError, compile_selector

# Environment overrides: the few settings operators change per deployment.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "SIDECRYPT_LISTEN_ADDRESS": ("listen", "address"),
    "SIDECRYPT_ADMIN_ADDRESS": ("admin", "address"),
    "SIDECRYPT_UPSTREAM_URL": ("upstream", "url"),
    "SIDECRYPT_LOG_LEVEL": ("log", "level"),
    "SIDECRYPT_WORKERS": ("server", "workers"),
}


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _check_address(value: str) -> str:
    parse_address(value)
    return value


Address = Annotated[str, Field(min_length=3)]


class SecretRef(Model):
    """A secret taken from the environment or a file, never written inline in the YAML."""

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env or file")
        return self

    def resolve(self) -> bytes:
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise ConfigError(f"environment variable {self.env} is not set")
            return value.encode()
        assert self.file is not None
        try:
            return self.file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {self.file}: {exc.strerror}") from None


def _secret(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError("secrets must be {env: NAME} or {file: PATH}, never inline")
    return value


class ListenTLS(Model):
    cert: Path
    key: Path
    client_ca: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"


class Listen(Model):
    address: str = "0.0.0.0:8443"
    tls: ListenTLS | None = None

    _addr = field_validator("address")(_check_address)


class Admin(Model):
    address: str | None = "127.0.0.1:9901"

    @field_validator("address")
    @classmethod
    def _addr(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)


class Server(Model):
    workers: int = Field(1, ge=1, le=256)
    grace_period: float = Field(10.0, ge=0)
    max_header_size: int = Field(8190, ge=1024, le=1 << 20)
    max_body_size: int = Field(
        1 << 20, ge=1024, description="largest body buffered for a transform"
    )
    backlog: int = Field(1024, ge=16)
    access_log: bool = False
    engine: Literal["lean", "aiohttp"] = Field(
        "lean", description="client connections: lean (proxy/front.py) or aiohttp's own"
    )
    keepalive_timeout: float = Field(
        75.0, gt=0, description="seconds an idle client connection is kept open"
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds to receive a body we buffer; for a streamed one, the longest pause",
    )
    send_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a client may leave its answer unread before it is disconnected",
    )
    tls_reload_interval: float = Field(
        5.0, ge=0, description="seconds between checks of TLS files for changes (0: SIGHUP only)"
    )


class Upstream(Model):
    url: str
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    insecure_skip_verify: bool = False
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    pool_size: int = Field(256, ge=1)
    pool_timeout: float = Field(
        10.0, gt=0, description="seconds a request waits for a free pooled connection (504 beyond)"
    )
    preserve_host: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("not a valid URL (need http:// or https:// and a host)")
        return value


class DataKeyLimits(Model):
    max_age: float = Field(300.0, gt=0)
    max_uses: int = Field(1_000_000, ge=1, le=1 << 32)
    max_bytes: int = Field(1 << 34, ge=1)
    decrypt_entries: int = Field(10_000, ge=1)
    decrypt_ttl: float = Field(300.0, gt=0)
    decrypt_concurrency: int = Field(
        16, ge=1, le=256, description="provider calls in flight to unwrap one response's keys"
    )


class Audit(Model):
    file: str | None = None
    on_failure: Literal["block", "drop"] = "block"
    hmac_key: SecretRef | None = None
    queue_size: int = Field(10_000, ge=1)
    max_file_bytes: int | None = Field(None, ge=4096, description="rotate audit.file beyond this")
    keep_files: int = Field(0, ge=0, description="rotated files kept (FILE.1 newest); 0 = all")
    checkpoint_interval: float = Field(10.0, gt=0, description="idle seconds before a checkpoint")
    fsync: bool = False

    _hk = field_validator("hmac_key", mode="before")(_secret)

    @model_validator(mode="after")
    def _key_required(self) -> Audit:
        if self.file is not None and self.hmac_key is None:
            raise _PathError(
                ("audit", "hmac_key"),
                "required when audit.file is set: the trail is HMAC-chained "
                "({env: NAME} or {file: PATH}, at least 16 bytes)",
            )
        return self


class Log(Model):
    level: Literal["debug", "info", "warning", "error", "DEBUG", "INFO", "WARNING", "ERROR"] = (
        "info"
    )
    format: Literal["json", "text"] = "json"


class FieldSpec(Model):
    """One selector with its options. A bare string in YAML means ``{path: ...}``."""

    path: str
    required: bool = False
    bind_as: str | None = None

    @field_validator("path", "bind_as")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                compile_selector(value)
            except SelectorError as exc:
                raise ValueError(str(exc)) from None
        return value


def _field_specs(value: Any) -> Any:
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


class TokenSpec(Model):
    """A token format and its mode (tokens/formats.py), refused here when its value space is
    too small for the mode. ``consistent: true``: one value, one token (lookups work)."""

    format: str
    consistent: bool = False
    keep_first: int | None = None
    keep_last: int | None = None
    min_length: int | None = None
    luhn: Literal["fail", "pass", "any"] | None = None
    pattern: str | tuple[str, ...] | None = None
    domain: Literal["keep", "tokenize"] | None = None

    def format_options(self) -> dict[str, Any]:
        names = ("keep_first", "keep_last", "min_length", "luhn", "pattern", "domain")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @model_validator(mode="after")
    def _format(self) -> TokenSpec:
        from .tokens.formats import build_format  # a leaf module: no I/O, no config import

        build_format(self.format, self.format_options(), consistent=self.consistent)
        return self


class TokenField(TokenSpec):
    """One selector whose value becomes (or is resolved from) a token."""

    path: str
    required: bool = False

    @field_validator("path")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compile_selector(value)
        except SelectorError as exc:
            raise ValueError(str(exc)) from None
        return value


class TokenLookup(Model):
    """Query and path parameters that carry a protected value: replaced with its consistent
    token before forwarding, so the app's own search finds the record."""

    query: dict[str, TokenSpec] = Field(default_factory=dict)
    path: dict[str, TokenSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> TokenLookup:
        for kind, specs in (("query", self.query), ("path", self.path)):
            for name, spec in specs.items():
                if not spec.consistent:
                    raise ValueError(
                        f"{kind}.{name}: a lookup needs consistent: true (a random token "
                        "never matches what the app stored)"
                    )
        return self


class Rule(Model):
    encrypt: tuple[FieldSpec, ...] = ()
    decrypt: tuple[FieldSpec, ...] = ()
    tokenize: tuple[TokenField, ...] = ()
    detokenize: tuple[TokenField, ...] = ()

    _e = field_validator("encrypt", "decrypt", mode="before")(_field_specs)

    @property
    def has_tokens(self) -> bool:
        return bool(self.tokenize or self.detokenize)


class Tokens(Model):
    """The token vault: which store holds it, and the in-memory cache in front of it."""

    store: str | None = Field(None, description="a stores.<name>; default: the only store")
    cache_entries: int = Field(100_000, ge=0)
    cache_ttl: float = Field(300.0, gt=0)
    batch_size: int = Field(1000, ge=1, le=10_000)


_PATTERN = re.compile(r"^/(?:[^?#\s]*)$")
_CONTEXT_SOURCE = re.compile(r"^(?:header|path|query):[A-Za-z0-9_.\-]+$")


class Match(Model):
    methods: tuple[str, ...] = ("*",)
    path: str

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one method (or '*')")
        return tuple(m.upper() for m in value)

    @field_validator("path")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if not _PATTERN.match(value):
            raise ValueError("a path pattern starts with / and has no query or spaces")
        for segment in value.split("/")[1:]:
            if "**" in segment and segment != "**":
                raise ValueError("'**' must be a whole path segment")
        return value


class Route(Model):
    match: Match
    key: str | None = None
    context: dict[str, str] = Field(default_factory=dict)
    request: Rule = Rule()
    response: Rule = Rule()
    on_decrypt_error: Literal["error", "ciphertext"] = "error"
    max_body_size: int | None = Field(None, ge=1024)
    allow_gzip: bool = False
    lookup: TokenLookup = TokenLookup()

    @field_validator("context")
    @classmethod
    def _context(cls, value: dict[str, str]) -> dict[str, str]:
        for name, source in value.items():
            if ":" in source and not _CONTEXT_SOURCE.match(source):
                raise ValueError(
                    f"context {name!r}: use header:NAME, path:NAME, query:NAME or a literal"
                )
        return value

    @model_validator(mode="after")
    def _key_needed(self) -> Route:
        has_fields = any(
            (
                self.request.encrypt,
                self.request.decrypt,
                self.response.encrypt,
                self.response.decrypt,
                self.has_tokens,
            )
        )
        if has_fields and self.key is None:
            raise ValueError("a route with field rules needs a key")
        segments = self.match.path.split("/")[1:]
        for name in self.lookup.path:
            if f"{{{name}}}" not in segments:
                raise ValueError(f"lookup.path.{name}: the pattern has no {{{name}}} segment")
            if "**" in segments[: segments.index(f"{{{name}}}")]:
                raise ValueError(f"lookup.path.{name}: {{{name}}} must come before any '**'")
        return self

    @property
    def has_tokens(self) -> bool:
        return bool(
            self.request.has_tokens
            or self.response.has_tokens
            or self.lookup.query
            or self.lookup.path
        )

    @property
    def label(self) -> str:
        return f"{'|'.join(self.match.methods)} {self.match.path}"


class Settings(Model):
    mode: Literal["server-side", "client-side"] = "server-side"
    allow_plain_upstream: bool = False
    listen: Listen = Listen()
    admin: Admin = Admin()
    server: Server = Server()
    upstream: Upstream
    data_keys: DataKeyLimits = DataKeyLimits()
    keys: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stores: dict[str, dict[str, Any]] = Field(default_factory=dict)
    audit: Audit = Audit()
    log: Log = Log()
    identity: IdentityConfig = IdentityConfig()
    policy: PolicyConfig = PolicyConfig()
    tokens: Tokens = Tokens()
    routes: tuple[Route, ...] = ()
    source: str = Field("<memory>", exclude=True)
    base_dir: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        for i, route in enumerate(self.routes):
            if route.key is not None and route.key not in self.keys:
                raise _PathError(("routes", i, "key"), f"unknown key {route.key!r}")
        self._check_tokens()
        if self.mode == "client-side":
            host, _ = parse_address(self.listen.address)
            if self.listen.tls is None and host not in ("127.0.0.1", "::1", "localhost"):
                raise _PathError(
                    ("listen", "address"),
                    "client-side mode without TLS must listen on loopback (127.0.0.1 or ::1)",
                )
            if URL(self.upstream.url).scheme != "https" and not self.allow_plain_upstream:
                raise _PathError(
                    ("upstream", "url"),
                    "client-side mode sends ciphertext to a remote server: the upstream must be "
                    "https (set allow_plain_upstream: true to override)",
                )
        return self

    def _check_tokens(self) -> None:
        if not any(route.has_tokens for route in self.routes):
            return
        if self.tokens.store is None:
            if len(self.stores) != 1:
                raise _PathError(
                    ("tokens", "store"),
                    "routes tokenize fields: name the vault's store here (one of stores:), "
                    "e.g. stores: {vault: {type: sqlite, path: vault.db}}",
                )
        elif self.tokens.store not in self.stores:
            raise _PathError(("tokens", "store"), f"unknown store {self.tokens.store!r}")
        for i, route in enumerate(self.routes):
            block = self.keys.get(route.key or "", {})
            hierarchy = block.get("hierarchy") if isinstance(block, dict) else None
            if route.has_tokens and isinstance(hierarchy, dict) and hierarchy.get("per"):
                raise _PathError(
                    ("routes", i, "key"),
                    f"key {route.key!r} has a branch key per {hierarchy['per']!r}; the token "
                    "vault's root is one per key (not per tenant) yet: use a key without "
                    "hierarchy.per for token rules",
                )

    @property
    def vault_store(self) -> str | None:
        """The store name the token vault lives on (None: no route tokenizes)."""
        if self.tokens.store is not None:
            return self.tokens.store
        if any(route.has_tokens for route in self.routes) and len(self.stores) == 1:
            return next(iter(self.stores))
        return None


class _PathError(ValueError):
    """A cross-field error that knows the dotted path it belongs to."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _format_errors(
    file: str, exc: ValidationError, env: Mapping[str, str] | None = None
) -> ConfigError:
    """One line per error; a value that came from an environment override names the variable."""
    lines = []
    paths = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = tuple(p for p in err["loc"] if p not in ("function-after[_one_source()]",))
        msg = err["msg"].removeprefix("Value error, ")
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _PathError):
            loc, msg = ctx_err.loc, ctx_err.message
        path = dotted(loc) or "(top level)"
        paths.append(path)
        var = (env or {}).get(path)
        if var is not None:
            lines.append(f"environment variable {var} (overrides {path}): {msg}")
        else:
            lines.append(f"{file}: {path}: {msg}")
    error = ConfigError("\n".join(lines))
    error.file, error.path = file, paths[0] if paths else None
    return error


_PATH_FIELDS = (
    ("listen", "tls", "cert"),
    ("listen", "tls", "key"),
    ("listen", "tls", "client_ca"),
    ("upstream", "ca"),
    ("upstream", "client_cert"),
    ("upstream", "client_key"),
)


def _absolutize(raw: dict[str, Any], base: Path) -> None:
    for loc in _PATH_FIELDS:
        node: Any = raw
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(loc[-1]), str):
            node[loc[-1]] = str(base / node[loc[-1]])


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Apply the environment overrides; returns {dotted path: variable} of those applied."""
    applied: dict[str, str] = {}
    for var, loc in ENV_OVERRIDES.items():
        if var in environ:
            node = raw
            for part in loc[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{var} overrides {dotted(loc)} but {part} is not a mapping")
            node[loc[-1]] = environ[var]
            applied[dotted(loc)] = var
    return applied


def parse(
    raw: Any,
    *,
    file: str = "<memory>",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Validate an already-loaded YAML document."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a mapping", file=file)
    raw = dict(raw)
    env = apply_env(raw, environ) if environ is not None else {}
    base = base_dir or Path(".")
    _absolutize(raw, base)
    raw["source"] = file
    raw["base_dir"] = base
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise _format_errors(file, exc, env) from None


def _refuse_duplicates(
    node: yaml.Node, loc: tuple[str | int, ...], file: str, seen: set[int]
) -> None:
    """A key given twice in one mapping is an error: YAML would silently keep the last one."""
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is None or key.tag == "tag:yaml.org,2002:merge":
                _refuse_duplicates(value, loc, file, seen)
                continue
            ident = (key.tag, name)
            if ident in first:
                raise ConfigError(
                    f"line {key.start_mark.line + 1}: duplicate key {name!r} "
                    f"(first on line {first[ident]}); YAML would keep only the last",
                    file=file,
                    path=dotted((*loc, name)),
                )
            first[ident] = key.start_mark.line + 1
            _refuse_duplicates(value, (*loc, name), file, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, (*loc, i), file, seen)


def _safe_load(text: str, file: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (with line and dotted path)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node, (), file, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, parse and validate a YAML file (``yaml.safe_load``, never full load)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", file=str(path)) from None
    try:
        raw = _safe_load(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}{problem}", file=str(path)) from None
    return parse(
        raw,
        file=str(path),
        base_dir=path.resolve().parent,
        environ=os.environ if environ is None else environ,
    )


def validate_provider_options(
    settings: Settings, lookup: Callable[[str], type[BaseModel] | None]
) -> dict[str, BaseModel]:
    """Check each ``keys.<name>`` block against its provider's options model."""
    out: dict[str, BaseModel] = {}
    for name, block in settings.keys.items():
        kind = block.get("provider") if isinstance(block, dict) else None
        if not isinstance(kind, str):
            raise ConfigError(
                "missing provider", file=settings.source, path=f"keys.{name}.provider"
            )
        model = lookup(kind)
        if model is None:
            raise ConfigError(
                f"unknown provider {kind!r}", file=settings.source, path=f"keys.{name}.provider"
            )
        try:
            out[name] = model.model_validate(block, context={"base_dir": settings.base_dir})
        except ValidationError as exc:
            err = _format_errors(settings.source, exc)
            raise ConfigError(
                "\n".join(
                    line.replace(f"{settings.source}: ", f"{settings.source}: keys.{name}.", 1)
                    for line in err.message.splitlines()
                )
            ) from None
    return out


_STORE_HINTS = {"postgresql": " (install it: pip install 'sidecrypt[postgresql]')"}


def validate_store_options(
    settings: Settings, lookup: Callable[[str], type[BaseModel] | None]
) -> dict[str, BaseModel]:
    """Check each ``stores.<name>`` block against its store type's options model."""
    out: dict[str, BaseModel] = {}
    for name, block in settings.stores.items():
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(kind, str):
            raise ConfigError("missing type", file=settings.source, path=f"stores.{name}.type")
        model = lookup(kind)
        if model is None:
            raise ConfigError(
                f"unknown store type {kind!r}{_STORE_HINTS.get(kind, '')}",
                file=settings.source,
                path=f"stores.{name}.type",
            )
        try:
            out[name] = model.model_validate(block, context={"base_dir": settings.base_dir})
        except ValidationError as exc:
            err = _format_errors(settings.source, exc)
            raise ConfigError(
                "\n".join(
                    line.replace(f"{settings.source}: ", f"{settings.source}: stores.{name}.", 1)
                    for line in err.message.splitlines()
                )
            ) from None
    return out
