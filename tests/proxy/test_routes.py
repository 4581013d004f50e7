"""Route compilation and matching: patterns, precedence, methods, path params, context."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict, MultiDict

from sidecrypt import config
from sidecrypt.errors import ConfigError, RequestError
from sidecrypt.proxy.routes import Router, adhoc_route


def route(path: str, methods: list[str] | None = None, **extra: Any) -> config.Route:
    match: dict[str, Any] = {"path": path}
    if methods is not None:
        match["methods"] = methods
    return config.Route.model_validate({"match": match, **extra})


def router(*routes: config.Route, max_body: int = 4096) -> Router:
    return Router(routes, default_max_body=max_body)


def hit(r: Router, method: str, path: str) -> tuple[int, dict[str, str]] | None:
    m = r.match(method, path)
    return None if m is None else (m[0].index, m[1])


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/users", "/users", True),
        ("/users", "/users/", True),  # many upstreams route /users/ as /users
        ("/users", "/users2", False),
        ("/users", "/Users", True),
        ("/users/**", "/users", True),
        ("/users/**", "/users/", True),
        ("/users/**", "/users/1", True),
        ("/users/**", "/users/1/cards/2", True),
        ("/users/**", "/usersx", False),
        ("/users/**", "/admin/users/1", False),
        ("/users/*/cards", "/users/1/cards", True),
        ("/users/*/cards", "/users/cards", False),
        ("/users/*/cards", "/users//cards", False),
        ("/users/*/cards", "/users/1/2/cards", False),
        ("/users/*/cards", "/users/1/cards/x", False),
        ("/a/**/z", "/a/z", True),
        ("/a/**/z", "/a/b/c/z", True),
        ("/a/**/z", "/a/b/c", False),
        ("/v1.0/x", "/v1.0/x", True),
        ("/v1.0/x", "/v1a0/x", False),  # literal dots are not regex wildcards
        ("/v1.0/*", "/v1a0/x", False),
        ("/**", "/anything/at/all", True),
    ],
)
def test_patterns(pattern: str, path: str, matches: bool) -> None:
    assert (hit(router(route(pattern)), "GET", path) is not None) is matches


def test_path_params_are_captured() -> None:
    r = router(route("/tenants/{tenant}/users/{id}"))
    assert hit(r, "GET", "/tenants/acme/users/42") == (0, {"tenant": "acme", "id": "42"})
    assert hit(r, "GET", "/tenants/acme/users") is None


def test_first_match_wins_across_literal_and_pattern_routes() -> None:
    r = router(route("/users/**"), route("/users/me"), route("/other"), route("/other"))
    assert hit(r, "GET", "/users/me") == (0, {})
    assert hit(r, "GET", "/other") == (2, {})
    r = router(route("/users/me"), route("/users/**"))
    assert hit(r, "GET", "/users/me") == (0, {})
    assert hit(r, "GET", "/users/you") == (1, {})


def test_methods_filter_and_fall_through() -> None:
    r = router(
        route("/users/**", ["POST", "put"]),
        route("/users/1", ["GET"]),
        route("/users/**"),
    )
    assert hit(r, "POST", "/users/1") == (0, {})
    assert hit(r, "put", "/users/1") == (0, {})
    assert hit(r, "GET", "/users/1") == (1, {})
    assert hit(r, "DELETE", "/users/1") == (2, {})
    assert hit(r, "DELETE", "/nope") is None


def test_no_routes_matches_nothing() -> None:
    assert router().match("GET", "/") is None


@pytest.mark.parametrize(
    "pattern",
    ["/users/{id}x", "/users/a*", "/users/{id}/{id}", "/users/{}"],
)
def test_bad_patterns_are_config_errors(pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"routes\[0\]\.match\.path"):
        router(route(pattern))


def test_compiled_route_fields_and_options() -> None:
    r = router(
        route(
            "/users/**",
            ["POST"],
            key="app",
            request={"encrypt": ["$.ssn", {"path": "$.card.number", "required": True}]},
            response={"decrypt": [{"path": "$.ssn", "bind_as": "$.social"}]},
            on_decrypt_error="ciphertext",
            max_body_size=2048,
            allow_gzip=True,
        ),
        route("/plain"),
        max_body=9999,
    )
    compiled = r.routes[0]
    assert compiled.label == "POST /users/**"
    assert compiled.key == "app"
    assert [f.text for f in compiled.request_encrypt] == ["$.ssn", "$.card.number"]
    assert [f.required for f in compiled.request_encrypt] == [False, True]
    assert compiled.response_decrypt[0].bind_as == "$.social"
    assert compiled.request_decrypt == () and compiled.response_encrypt == ()
    assert compiled.needs_request_body and compiled.needs_response_body
    assert (compiled.on_decrypt_error, compiled.max_body_size, compiled.allow_gzip) == (
        "ciphertext",
        2048,
        True,
    )
    assert compiled.decrypt_keys == frozenset({"app"})
    plain = r.routes[1]
    assert not plain.needs_request_body and not plain.needs_response_body
    assert plain.max_body_size == 9999 and plain.on_decrypt_error == "error"


def ctx_route(context: dict[str, str], path: str = "/t/{tenant}/u/{id}") -> Router:
    return router(route(path, key="app", context=context, request={"encrypt": ["$.x"]}))


def test_context_from_every_source_is_canonical() -> None:
    r = ctx_route(
        {"tenant": "path:tenant", "user": "header:X-User", "region": "query:region", "app": "crm"}
    )
    compiled, params = r.match("POST", "/t/acme/u/7") or (None, {})
    assert compiled is not None
    ctx = compiled.context(CIMultiDict({"x-user": "bob"}), params, MultiDict({"region": "eu"}))
    assert ctx == (("app", "crm"), ("region", "eu"), ("tenant", "acme"), ("user", "bob"))


def test_context_headers_from_plain_dict_are_case_insensitive() -> None:
    compiled = ctx_route({"tenant": "header:X-Tenant"}).routes[0]
    assert compiled.context({"x-tenant": "acme"}, {}, {}) == (("tenant", "acme"),)


def test_route_without_context() -> None:
    compiled = ctx_route({}).routes[0]
    assert compiled.context({}, {}, {}) == ()
    assert not compiled.has_context


@pytest.mark.parametrize(
    ("headers", "query", "code", "names"),
    [
        ({}, {"region": "eu"}, "missing_context", "header 'X-Tenant'"),
        ({"X-Tenant": ""}, {"region": "eu"}, "missing_context", "header 'X-Tenant'"),
        ({"X-Tenant": "acme"}, {}, "missing_context", "query 'region'"),
    ],
)
def test_missing_context_source_is_400_naming_the_entry(
    headers: dict[str, str], query: dict[str, str], code: str, names: str
) -> None:
    compiled = ctx_route({"tenant": "header:X-Tenant", "region": "query:region"}).routes[0]
    with pytest.raises(RequestError) as info:
        compiled.context(CIMultiDict(headers), {}, MultiDict(query))
    assert info.value.status == 400 and info.value.code == code
    assert names in info.value.message


def test_repeated_context_header_is_rejected_without_echoing_values() -> None:
    compiled = ctx_route({"tenant": "header:X-Tenant"}).routes[0]
    headers = CIMultiDict([("X-Tenant", "acme-secret"), ("x-tenant", "evil-secret")])
    with pytest.raises(RequestError, match="more than once") as info:
        compiled.context(headers, {}, {})
    assert "secret" not in info.value.message


def test_context_path_param_must_exist_in_pattern() -> None:
    with pytest.raises(ConfigError, match=r"routes\[0\]\.context.*path:nope"):
        ctx_route({"tenant": "path:nope"})


def test_adhoc_route_for_the_offline_cli() -> None:
    r = adhoc_route("app", ["$.a", "$.b[*]"], context={"t": "x"})
    assert r.key == "app" and [f.text for f in r.request_encrypt] == ["$.a", "$.b[*]"]
    assert r.request_encrypt == r.response_decrypt
    assert r.context({}, {}, {}) == (("t", "x"),) and r.has_context
    assert r.decrypt_keys == frozenset({"app"})
    assert adhoc_route("app", ["$.a"], any_key=True).decrypt_keys is None
    assert not adhoc_route("app", ["$.a"]).has_context


@pytest.mark.parametrize(
    ("path", "matches"),
    [
        ("/accounts/7", True),
        ("/ACCOUNTS/7", True),  # ASP.NET/IIS route case-insensitively
        ("/Accounts/7", True),
        ("/accounts/7/", True),
        ("/accounts;jsessionid=x/7", True),
        ("/accounts/7;v=1", True),
        ("/ACCOUNTS;x=1/7/", True),
        ("/accounts/8", False),
        ("/1/2", False),  # no cased characters: nothing to retry
        ("/", False),
    ],
)
def test_the_retry_form_catches_what_upstreams_normalise(path: str, matches: bool) -> None:
    r = router(route("/accounts/7"))
    assert (hit(r, "GET", path) is not None) is matches


def test_the_retry_form_lower_cases_non_ascii_too() -> None:
    r = router(route("/café/1"))
    assert hit(r, "GET", "/CAFÉ/1") == (0, {})


def test_an_empty_path_is_retried_as_the_root() -> None:
    assert hit(router(route("/")), "GET", "") == (0, {})


# -- every method on a protected path (Router.lookup's second answer) ---------------------------

ENC = {"key": "k", "request": {"encrypt": ["$.ssn"]}}


def test_lookup_names_the_route_that_protects_a_body_for_any_method() -> None:
    r = router(
        route("/users/me", ["GET"], key="k", response={"decrypt": ["$.ssn"]}),
        route("/users/**", ["POST"], **ENC),
        route("/admins/{id}", ["PUT"], **ENC),
        route("/open/**"),
    )
    own, guard = r.lookup("DELETE", "/users/1")
    assert own is None and guard is not None and guard[0].index == 1
    own, guard = r.lookup("GET", "/users/me")  # its own route has response rules only
    assert own is not None and own[0].index == 0 and guard is not None and guard[0].index == 1
    own, guard = r.lookup("propfind", "/admins/7")
    assert own is None and guard == (r.routes[2], {"id": "7"})
    assert r.lookup("POST", "/open/x") == ((r.routes[3], {}), None)
    assert r.lookup("POST", "/nowhere") == (None, None)
    assert r.lookup("PATCH", "/ADMINS/7/")[1] is not None  # the retry form counts too


def test_the_first_protecting_route_wins_across_literal_and_pattern_routes() -> None:
    r = router(route("/a/*", ["PUT"], **ENC), route("/a/b", ["POST"], **ENC))
    assert r.lookup("DELETE", "/a/b")[1] == (r.routes[0], {})
    r = router(route("/a/b", ["PUT"], **ENC), route("/a/*", ["POST"], **ENC))
    assert r.lookup("DELETE", "/a/b")[1] == (r.routes[0], {})
    assert r.lookup("POST", "/a/b") == ((r.routes[1], {}), (r.routes[0], {}))


def test_many_patterns_still_match_in_config_order() -> None:
    routes = [route(f"/p{i}/{{id}}/**", ["POST"], **ENC) for i in range(40)]
    r = router(*routes, route("/p7/x", ["POST"], **ENC))
    assert r.lookup("POST", "/p7/x") == ((r.routes[7], {"id": "x"}), (r.routes[7], {"id": "x"}))
    assert r.lookup("POST", "/p39/1/2")[0] == (r.routes[39], {"id": "1"})
    assert r.lookup("POST", "/p40/1") == (None, None)


def test_reading_folds_patterns_for_the_path_rule() -> None:
    r = router(route("/Users/{Id}", ["POST"], **ENC))
    assert r.reading("POST", "/users/1", folded=True) == (r.routes[0], r.routes[0])
    assert r.reading("GET", "/users/1", folded=True) == (r.routes[0], r.routes[0])
    assert r.reading("POST", "/other/1", folded=True) == (None, None)
    assert not r.ambiguous("POST", "/Users/1", *r.lookup("POST", "/Users/1"))
    assert r.ambiguous("POST", "/Users./1", *r.lookup("POST", "/Users./1"))
    assert not router(route("/x")).has_rules
