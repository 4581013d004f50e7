"""Route matching, compiled once at start-up.

Patterns are whole path segments: a literal, ``*`` (exactly one non-empty segment), ``{name}``
(one segment, captured as a path parameter for ``path:name`` context entries) or ``**`` (any
number of segments, including none: ``/users/**`` matches ``/users`` and ``/users/1/cards``).
The first route (in config order) whose methods and pattern match wins. Literal patterns are
found with one dict lookup; only pattern routes listed before that hit are tried as regexes.
Match against the *decoded* path (aiohttp's ``request.path``), the one the upstream app routes
on, so percent-encoding cannot slip a request past its rule.

A path protects every method: :meth:`Router.lookup` also gives the first route with request
rules whatever its methods, whose rules a body sent with an unlisted method takes (app.py). The
path rule (transform/paths.py) compares the readings of a target against patterns folded the
same way (:meth:`Router.ambiguous`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import config, keys
from ..errors import ConfigError, RequestError
from ..selectors import Selector, compile_selector, label
from ..transform import paths
from ..transform.guard import GuardPlan

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SOURCES = ("header:", "path:", "query:")


@dataclass(frozen=True, slots=True)
class CompiledField:
    """One field rule: the selector, whether it must match, and the AAD label override."""

    text: str
    selector: Selector
    required: bool = False
    bind_as: str | None = None
    members: tuple[str, ...] | None = None  # a plain member chain: no generator walk needed
    fixed_label: str | None = None  # bind_as, or the label of a plain member chain


# (parent member chain, last member, label, field) per field: see FieldList.direct.
DirectPlan = tuple[tuple[tuple[str, ...], str, str, CompiledField], ...]


class FieldList(tuple[CompiledField, ...]):
    """A route's compiled fields, with ``direct`` worked out once.

    ``direct`` is set when every field is a plain member chain and none equals or extends
    another: then the slots are found by walking each chain, with no dedup or nesting to
    resolve (fields.py). Otherwise it is None and the general selector walk runs.
    ``guard`` is the same fields compiled for the shape-independent guard (transform/guard.py).
    """

    direct: DirectPlan | None
    guard: GuardPlan

    def __new__(cls, fields: Sequence[CompiledField] = ()) -> FieldList:
        self = super().__new__(cls, fields)
        self.direct = _direct_plan(self)
        self.guard = GuardPlan(self)
        return self


def _direct_plan(fields: Sequence[CompiledField]) -> DirectPlan | None:
    chains = [f.members for f in fields]
    if not all(chains):
        return None
    plain = [c for c in chains if c]
    if any(a[: len(b)] == b for i, a in enumerate(plain) for j, b in enumerate(plain) if i != j):
        return None
    return tuple(
        (c[:-1], c[-1], f.fixed_label or "", f) for c, f in zip(plain, fields, strict=True)
    )


def compile_fields(specs: Sequence[config.FieldSpec | str]) -> FieldList:
    """Config field specs (or bare selector strings, for the offline CLI) -> compiled fields."""
    out = []
    for spec in specs:
        if isinstance(spec, str):
            spec = config.FieldSpec(path=spec)
        selector = compile_selector(spec.path)
        members = tuple(arg for _, arg in selector.steps) if selector.is_simple else None
        fixed = spec.bind_as or (label(members) if members is not None else None)
        out.append(CompiledField(spec.path, selector, spec.required, spec.bind_as, members, fixed))
    return FieldList(out)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A route ready to serve: everything the request path needs, precomputed."""

    index: int
    label: str
    methods: frozenset[str] | None  # None: any method
    key: str | None
    request_encrypt: tuple[CompiledField, ...]
    request_decrypt: tuple[CompiledField, ...]
    response_encrypt: tuple[CompiledField, ...]
    response_decrypt: tuple[CompiledField, ...]
    on_decrypt_error: str
    max_body_size: int
    allow_gzip: bool
    context_sources: tuple[tuple[str, str, str], ...]  # (context name, kind, argument)
    decrypt_keys: frozenset[str] | None = None  # key names accepted on decrypt; None: any
    pattern: re.Pattern[str] | None = None  # None: a literal path
    literal: str | None = None
    tokens: Any = None  # proxy/tokenize.py's TokenRules, or None: no token rules

    @property
    def needs_request_body(self) -> bool:
        return bool(self.request_encrypt or self.request_decrypt or self.tokens_request)

    @property
    def needs_response_body(self) -> bool:
        return bool(self.response_encrypt or self.response_decrypt or self.tokens_response)

    @property
    def tokens_request(self) -> bool:
        return self.tokens is not None and bool(self.tokens.request)

    @property
    def tokens_response(self) -> bool:
        return self.tokens is not None and bool(self.tokens.response)

    @property
    def has_context(self) -> bool:
        return bool(self.context_sources)

    def allows(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def context(
        self,
        headers: Mapping[str, str],
        path_params: Mapping[str, str],
        query: Mapping[str, str],
    ) -> keys.Context:
        """The encryption context for one request; a missing source is the client's 400."""
        if not self.context_sources:
            return ()
        pairs = []
        for name, kind, arg in self.context_sources:
            if kind == "literal":
                pairs.append((name, arg))
                continue
            source: Any = headers if kind == "header" else path_params if kind == "path" else query
            values = source.getall(arg, ()) if hasattr(source, "getall") else None
            if values is not None:
                if len(values) > 1:
                    raise RequestError(
                        f"encryption context {name!r}: {kind} {arg!r} is given more than once",
                        code="ambiguous_context",
                    )
                value = values[0] if values else None
            elif kind == "header":  # a plain dict: compare names case-insensitively
                lower = arg.lower()
                value = next((v for k, v in source.items() if k.lower() == lower), None)
            else:
                value = source.get(arg)
            if not value:
                raise RequestError(
                    f"encryption context {name!r} needs {kind} {arg!r}, which the request lacks",
                    code="missing_context",
                )
            pairs.append((name, value))
        pairs.sort()
        return tuple(pairs)


def _compile_pattern(path: str) -> tuple[re.Pattern[str] | None, set[str]]:
    """A literal path -> (None, {}); otherwise a full-match regex and its parameter names."""
    segments = path.split("/")[1:]
    if not any("*" in s or "{" in s or "}" in s for s in segments):
        return None, set()
    out, params = [], set()
    for seg in segments:
        if seg == "**":
            out.append("(?:/.*)?")
        elif seg == "*":
            out.append("/[^/]+")
        elif (m := _PARAM.fullmatch(seg)) is not None:
            name = m.group(1)
            if name in params:
                raise ValueError(f"path parameter {{{name}}} appears twice")
            params.add(name)
            out.append(f"/(?P<{name}>[^/]+)")
        elif "{" in seg or "}" in seg or "*" in seg:
            raise ValueError(f"segment {seg!r}: '*', '**' and '{{name}}' must be whole segments")
        else:
            out.append("/" + re.escape(seg))
    return re.compile("".join(out)), params


def compile_route(index: int, route: config.Route, *, default_max_body: int) -> CompiledRoute:
    where = f"routes[{index}]"
    try:
        pattern, params = _compile_pattern(route.match.path)
    except ValueError as exc:
        raise ConfigError(str(exc), path=f"{where}.match.path") from None
    sources = []
    for name, source in route.context.items():
        if not source.startswith(_SOURCES):
            sources.append((name, "literal", source))
            continue
        kind, _, arg = source.partition(":")
        if kind == "path" and arg not in params:
            raise ConfigError(
                f"context {name!r} uses path:{arg} but the pattern has no {{{arg}}}",
                path=f"{where}.context",
            )
        sources.append((name, kind, arg))
    methods = frozenset(route.match.methods)
    from .tokenize import compile_token_rules  # tokenize imports this module

    return CompiledRoute(
        index=index,
        label=route.label,
        methods=None if "*" in methods else methods,
        key=route.key,
        request_encrypt=compile_fields(route.request.encrypt),
        request_decrypt=compile_fields(route.request.decrypt),
        response_encrypt=compile_fields(route.response.encrypt),
        response_decrypt=compile_fields(route.response.decrypt),
        on_decrypt_error=route.on_decrypt_error,
        max_body_size=route.max_body_size or default_max_body,
        allow_gzip=route.allow_gzip,
        context_sources=tuple(sources),
        decrypt_keys=frozenset([route.key]) if route.key else frozenset(),  # no key: decrypt none
        pattern=pattern,
        literal=route.match.path if pattern is None else None,
        tokens=compile_token_rules(index, route),
    )


def adhoc_route(
    key: str,
    selectors: Sequence[config.FieldSpec | str],
    *,
    context: Mapping[str, str] | None = None,
    on_decrypt_error: str = "error",
    any_key: bool = False,
) -> CompiledRoute:
    """A route for the offline CLI: the same fields for both directions.

    ``context`` given: it is used to encrypt and must equal the stored context to decrypt.
    ``any_key``: decrypt tokens made under any configured key (backfills across rotations).
    """
    fields = compile_fields(selectors)
    return CompiledRoute(
        index=-1,
        label="offline",
        methods=None,
        key=key,
        request_encrypt=fields,
        request_decrypt=fields,
        response_encrypt=fields,
        response_decrypt=fields,
        on_decrypt_error=on_decrypt_error,
        max_body_size=1 << 62,
        allow_gzip=False,
        context_sources=tuple((k, "literal", v) for k, v in sorted((context or {}).items())),
        decrypt_keys=None if any_key else frozenset([key]),
        literal="",
    )


Hit = tuple[CompiledRoute, dict[str, str]]


class _Index:
    """Routes by path: literal paths in a dict, patterns as regexes in config order."""

    __slots__ = ("any", "literal", "patterns")

    def __init__(
        self, entries: Sequence[tuple[CompiledRoute, str | None, re.Pattern[str] | None]]
    ) -> None:
        self.literal: dict[str, tuple[CompiledRoute, ...]] = {}
        patterns = []
        for route, literal, pattern in entries:
            if pattern is None:
                key = literal or ""
                self.literal[key] = (*self.literal.get(key, ()), route)
            else:
                patterns.append((route, pattern, route.index, route.needs_request_body))
        self.patterns = tuple(patterns)
        # Every pattern in one regex: a path no route matches (pass-through) costs one test.
        union = "|".join(_GROUP.sub("(?:", p.pattern) for _, p, _, _ in patterns)
        self.any = re.compile(union) if patterns else None

    def scan(self, method: str, path: str) -> tuple[Hit | None, Hit | None]:
        """(the first route for ``method``, the first route with request rules for any method).

        One pass over the patterns for both: the second is what a body on this path must be
        protected by whatever its method (see Router.lookup).
        """
        literal = self.literal.get(path)
        if literal is None and (self.any is None or self.any.fullmatch(path) is None):
            return None, None
        own: Hit | None = None
        guard: Hit | None = None
        for route in literal or ():
            if own is None and route.allows(method):
                own = (route, {})
            if guard is None and route.needs_request_body:
                guard = (route, {})
            if own is not None and guard is not None:
                break
        own_limit = own[0].index if own is not None else _NO_LIMIT
        guard_limit = guard[0].index if guard is not None else _NO_LIMIT
        for route, pattern, i, protects in self.patterns:
            if i >= own_limit and i >= guard_limit:
                break
            want_own = i < own_limit and route.allows(method)
            want_guard = protects and i < guard_limit
            if (want_own or want_guard) and (m := pattern.fullmatch(path)) is not None:
                hit = (route, m.groupdict())
                if want_own:
                    own, own_limit = hit, i
                if want_guard:
                    guard, guard_limit = hit, i
        return own, guard


_NO_LIMIT = 1 << 62
_GROUP = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")


class Router:
    """First match wins; literal paths by dict lookup, patterns by regex in config order."""

    def __init__(self, routes: Sequence[config.Route], *, default_max_body: int) -> None:
        self.routes = tuple(
            compile_route(i, r, default_max_body=default_max_body) for i, r in enumerate(routes)
        )
        self._exact = _Index([(r, r.literal, r.pattern) for r in self.routes])
        folded = []
        for raw, route in zip(routes, self.routes, strict=True):
            pattern, _ = _compile_pattern(paths.fold_pattern(raw.match.path))
            folded.append((route, paths.fold_pattern(raw.match.path), pattern))
        self._folded = _Index(folded)
        ruled = [r for r in self.routes if r.needs_request_body or r.needs_response_body]
        # True when some route has field rules: only then do paths need the reading rule.
        self.has_rules = bool(ruled)
        self._firsts = paths.first_segments(
            [raw.match.path for raw, r in zip(routes, self.routes, strict=True) if r in ruled]
        )

    def match(self, method: str, path: str) -> Hit | None:
        """The first route for ``method`` and ``path`` (see :meth:`lookup`)."""
        return self.lookup(method, path)[0]

    def lookup(self, method: str, path: str) -> tuple[Hit | None, Hit | None]:
        """(the first route for ``method``, the first route with request rules for any method).

        A path no route matches is tried once more in the form many upstreams route it as:
        without matrix parameters (``/a;jsessionid=x/b``, Tomcat/Spring), without a trailing
        slash (Spring < 6, Django, Flask) and in lower case (ASP.NET, IIS). Matching more only
        ever encrypts more.
        """
        method = method.upper()
        own, guard = self._exact.scan(method, path)
        # The retry form differs from the path only through ";", a trailing "/", upper case or
        # an empty path ("/").
        if (
            own is None
            and guard is None
            and (not path or ";" in path or path.endswith("/") or path != path.lower())
        ):
            # Case too: ASP.NET, IIS and many others route /USERS/1 as /users/1.
            alt = "/".join(seg.partition(";")[0] for seg in path.split("/")).rstrip("/") or "/"
            alt = alt.lower()
            if alt != path:
                return self._exact.scan(method, alt)
        return own, guard

    def reading(self, method: str, path: str, *, folded: bool = False) -> paths.Reading:
        """The routes whose rules would apply to ``method`` on ``path``: (the method's own
        route if it has field rules, the route whose request rules protect a body).

        ``folded``: ``path`` is a folded form (transform/paths.py), matched against the folded
        patterns.
        """
        if folded:
            if self._firsts is not None and path.split("/", 2)[1] not in self._firsts:
                return _NO_READING
            own, guard = self._folded.scan(method.upper(), path)
        else:
            own, guard = self.lookup(method, path)
        return reading_of(own, guard)

    def ambiguous(self, method: str, raw: str, match: Hit | None, guard: Hit | None) -> bool:
        """The path rule (transform/paths.py) for a raw path whose own lookup gave ``match``
        and ``guard``: True when some reading of it selects other field rules."""
        return paths.conflict(
            paths.readings(raw),
            reading_of(match, guard),
            lambda form: self.reading(method, form, folded=True),
        )


_NO_READING: paths.Reading = (None, None)


def reading_of(own: Hit | None, guard: Hit | None) -> paths.Reading:
    """(the route whose rules apply to the request, the route whose request rules protect a
    body): a method no route lists takes the protecting route's rules (app.py)."""
    mine = own[0] if own is not None else None
    if mine is not None and not (mine.needs_request_body or mine.needs_response_body):
        mine = None
    if mine is not None and mine.needs_request_body:
        return (mine, mine)
    body = guard[0] if guard is not None else None
    return (mine if own is not None else body, body)
