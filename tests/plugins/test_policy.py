"""Reveal policy: decisions per principal, purposes, defaults, admins, config errors, audit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pluggy
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from sidecrypt import appkeys, config, hookimpl
from sidecrypt.errors import ConfigError, PluginError, RequestError
from sidecrypt.identity import Principal
from sidecrypt.plugin_manager import make_plugin_manager
from sidecrypt.plugins import policy
from sidecrypt.plugins.policy import field_matches, make_decider, mask_value
from sidecrypt.plugins.policy_model import MaskConfig

ROUTE = "GET /users/**"
FIELDS = ["$.ssn", "$.card.number", "$.contacts[*].phone", "$.note"]

BILLING = Principal("billing", "mtls", frozenset({"billing"}))
SUPPORT = Principal("desk1.support.test", "mtls", frozenset({"support"}))
STRANGER = Principal("stranger", "mtls")
AUDITOR = Principal("alice", "jwt", frozenset({"auditor"}))

RULES: list[dict[str, Any]] = [
    {
        "key": "app",
        "fields": ["$.ssn", "$.card.number"],
        "principals": ["mtls:billing"],
        "roles": ["jwt:auditor"],
        "otherwise": "mask",
    },
    {"route": "/users/**", "fields": ["$..phone"], "roles": ["support"], "otherwise": "deny"},
    {"fields": ["$.note"], "roles": ["auditor"], "purposes": ["audit"], "otherwise": "drop"},
]


def make_settings(
    policy_cfg: dict[str, Any] | None = None,
    *,
    identity_cfg: dict[str, Any] | None = None,
    mode: str = "server-side",
    tmp: Path | None = None,
) -> config.Settings:
    raw: dict[str, Any] = {
        "mode": mode,
        "upstream": {"url": "https://127.0.0.1:1"},
        "keys": {"app": {"provider": "local"}, "other": {"provider": "local"}},
        "identity": identity_cfg
        if identity_cfg is not None
        else {"mtls": {}, "header": {"trusted_cidrs": ["127.0.0.1/32"]}},
        "routes": [
            {
                "match": {"methods": ["GET"], "path": "/users/**"},
                "key": "app",
                "response": {"decrypt": FIELDS},
            }
        ],
    }
    if mode == "client-side":
        raw["listen"] = {"address": "127.0.0.1:8443"}
    if policy_cfg is not None:
        raw["policy"] = policy_cfg
    return config.parse(raw, file="test.yaml", base_dir=tmp or Path("."))


def pm_for(settings: config.Settings, *extra: object) -> pluggy.PluginManager:
    pm = make_plugin_manager(extra, entry_points=False)
    policy.install(pm, settings)
    return pm


def view(pm: pluggy.PluginManager, who: Principal | None, purpose: str | None = None) -> list[str]:
    decide = make_decider(pm, who, ROUTE, "app", purpose)
    return [decide(f) for f in ("$.ssn", "$.card.number", "$.contacts[*].phone", "$.note")]


def test_each_principal_gets_its_view() -> None:
    pm = pm_for(make_settings({"rules": RULES}))
    assert view(pm, BILLING) == ["reveal", "reveal", "deny", "drop"]
    assert view(pm, AUDITOR) == ["reveal", "reveal", "deny", "drop"]
    assert view(pm, AUDITOR, purpose="audit") == ["reveal", "reveal", "deny", "reveal"]
    assert view(pm, SUPPORT) == ["mask", "mask", "reveal", "drop"]
    assert view(pm, STRANGER) == ["mask", "mask", "deny", "drop"]
    assert view(pm, None) == ["mask", "mask", "deny", "drop"]


def test_source_qualified_refs_do_not_match_other_sources() -> None:
    pm = pm_for(make_settings({"rules": RULES}))
    # same id and role, but established by the trusted header, not mTLS / JWT
    assert view(pm, Principal("billing", "header", frozenset({"auditor"})))[:2] == ["mask", "mask"]


def test_key_and_route_scope_rules() -> None:
    pm = pm_for(make_settings({"rules": RULES}))
    assert make_decider(pm, BILLING, ROUTE, "other", None)("$.ssn") == "ciphertext"
    assert make_decider(pm, SUPPORT, "GET /orders/**", "app", None)("$.a[*].phone") == "ciphertext"


def test_uncovered_fields_default_to_ciphertext_once_rules_exist() -> None:
    pm = pm_for(make_settings({"rules": RULES[:1]}))
    assert make_decider(pm, BILLING, ROUTE, "app", None)("$.note") == "ciphertext"
    pm = pm_for(make_settings({"rules": RULES[:1], "default": "mask"}))
    assert make_decider(pm, BILLING, ROUTE, "app", None)("$.note") == "mask"


def test_no_policy_reveals_to_anyone_and_says_so() -> None:
    settings = make_settings()
    assert view(pm_for(settings), None) == ["reveal"] * 4
    assert "revealed to any caller" in policy.describe_default(settings)

    def open_to_all(s: config.Settings) -> list[str]:
        return [w for w in policy.startup_warnings(s) if "any caller" in w]

    warnings = open_to_all(settings)
    assert len(warnings) == 1 and warnings[0].startswith("server-side mode")
    assert "$.ssn" in warnings[0] and ROUTE in warnings[0]
    assert open_to_all(make_settings(mode="client-side")) == []
    assert open_to_all(make_settings({"rules": RULES})) == []
    assert len(open_to_all(make_settings({"rules": RULES[2:], "default": "reveal"}))) == 1
    assert "3 rule(s)" in policy.describe_default(make_settings({"rules": RULES}))


def test_startup_warnings_flag_risky_identity_setups() -> None:
    s = make_settings(
        {"rules": RULES[:1]}, identity_cfg={"header": {"trusted_cidrs": ["0.0.0.0/0"]}}
    )
    text = "\n".join(policy.startup_warnings(s))
    assert "trusts every address" in text
    assert "client_ca" in "\n".join(policy.startup_warnings(make_settings({"rules": RULES[:1]})))


def test_no_engine_fails_closed_and_third_party_answers_first() -> None:
    pm = make_plugin_manager(entry_points=False)  # policy engine never installed
    assert make_decider(pm, BILLING, ROUTE, "app", None)("$.ssn") == "ciphertext"

    class RevealNotes:
        @hookimpl
        def sidecrypt_authorize(self, field: str) -> str | None:
            return "reveal" if field == "$.note" else None

    pm = pm_for(make_settings({"rules": RULES}), RevealNotes())
    assert view(pm, STRANGER) == ["mask", "mask", "deny", "reveal"]


def test_unknown_outcome_from_a_plugin_is_an_error() -> None:
    class Broken:
        @hookimpl
        def sidecrypt_authorize(self) -> str:
            return "maybe"

    pm = pm_for(make_settings(), Broken())
    with pytest.raises(PluginError):
        make_decider(pm, None, ROUTE, "app", None)("$.ssn")


def test_decider_caches_per_label_and_audits_each_outcome() -> None:
    calls: list[str] = []

    class Count:
        @hookimpl(tryfirst=True)
        def sidecrypt_authorize(self, field: str) -> None:
            calls.append(field)

    pm = pm_for(make_settings({"rules": RULES}), Count())
    decide = make_decider(pm, AUDITOR, ROUTE, "app", "audit")
    for _ in range(3):
        for f in FIELDS:
            decide(f)
    assert calls == FIELDS
    events = {e.outcome: e for e in decide.audit_events(request_id="r1")}
    assert set(events) == {"revealed", "denied"}
    revealed = events["revealed"]
    assert revealed.fields == ("$.ssn", "$.card.number", "$.note")
    assert (revealed.principal, revealed.purpose, revealed.key) == ("jwt:alice", "audit", "app")
    assert (revealed.action, revealed.route, revealed.request_id) == ("reveal", ROUTE, "r1")
    assert decide.denied


def test_masking() -> None:
    pm = pm_for(make_settings({"rules": RULES, "mask": {"keep_last": 2, "char": "#"}}))
    decide = make_decider(pm, STRANGER, ROUTE, "app", None)
    assert decide("$.ssn") == "mask"
    assert decide.mask("$.ssn", "123-45-6789") == "#########89"
    m = MaskConfig()
    assert mask_value("4111111111111111", m) == "*" * 12 + "1111"
    assert mask_value("12345", m) == "***45"  # never more than half
    assert mask_value("ab", m) == "*b"
    assert mask_value("", m) == ""
    assert mask_value(123456789, m) == "*****6789"
    assert mask_value({"a": 1}, m) == mask_value(True, m) == "********"


@pytest.mark.parametrize(
    ("rule", "field", "expected"),
    [
        ("$.ssn", "$.ssn", True),
        ("$..phone", "$.contacts[*].phone", True),
        ("$..phone", "$.phone", True),
        ("$..phone", "$.contacts[*].phone_ext", False),
        ("$.contacts[*].phone", "$.contacts[*].phone", True),
        ("$.contacts.*.phone", "$.contacts[*].phone", True),
        ("$.card.*", "$.card.number", True),
        ("$.card.*", "$.card", False),
        ("$.card", "$.card.number", False),
        ("$['a b']", "$['a b']", True),
        ("$.ssn", "$..ssn", False),
    ],
)
def test_field_selectors_cover_labels(rule: str, field: str, expected: bool) -> None:
    assert field_matches(rule, field) is expected


def test_purpose_header() -> None:
    settings = make_settings({"purpose_header": "X-Why"})

    def req(value: str | None) -> web.Request:
        return make_mocked_request("GET", "/", headers={"X-Why": value} if value else {})

    assert policy.purpose_of(req(None), settings) is None
    assert policy.purpose_of(req(" billing-run "), settings) == "billing-run"
    with pytest.raises(RequestError) as err:
        policy.purpose_of(req("drop table; \u00e9"), settings)
    assert err.value.status == 400 and "drop table" not in err.value.message


def test_key_administration_is_separate_from_use() -> None:
    settings = make_settings(
        {"rules": RULES, "admins": {"principals": ["mtls:ops"], "roles": ["jwt:key-admin"]}},
        identity_cfg={"mtls": {}, "jwt": {"issuer": "i", "audience": "a", "public_keys": ["k"]}},
    )
    assert policy.may_administer(Principal("ops", "mtls"), settings)
    assert policy.may_administer(Principal("x", "jwt", frozenset({"key-admin"})), settings)
    assert not policy.may_administer(BILLING, settings)  # may reveal, may not administer
    assert not policy.may_administer(Principal("ops", "header"), settings)
    assert not policy.may_administer(None, settings)
    assert not policy.may_administer(Principal("ops", "mtls"), make_settings({"rules": RULES}))
    assert "nobody" in policy.describe_default(make_settings({"rules": RULES}))


@pytest.mark.parametrize(
    ("rules", "path", "message"),
    [
        ([{"roles": ["ldap:admins"]}], "policy.rules[0].roles[0]", "unknown role source"),
        (
            [{"principals": ["a", "kerberos:x"]}],
            "policy.rules[0].principals[1]",
            "unknown principal",
        ),
        ([{"fields": ["$.a[0]"]}], "policy.rules[0].fields[0]", "[*]"),
        ([{"fields": ["ssn"]}], "policy.rules[0].fields[0]", "must start with"),
        ([{"purposes": ["a b"]}], "policy.rules[0].purposes[0]", "purpose"),
        ([{}, {"otherwise": "reveal"}], "policy.rules[1].otherwise", ""),
        ([{"principal": ["typo"]}], "policy.rules[0].principal", ""),
    ],
)
def test_model_errors_name_the_path(rules: Any, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_settings({"rules": rules})
    assert f"test.yaml: {path}: " in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("cfg", "path", "message"),
    [
        ({"rules": [{"key": "nope"}]}, "policy.rules[0].key", "unknown key 'nope'"),
        ({"rules": [{"route": "/orders/**"}]}, "policy.rules[0].route", "unknown route"),
        ({"rules": [{"route": ROUTE, "key": "other"}]}, "policy.rules[0].key", "never applies"),
        ({"rules": [{}, {"roles": ["jwt:auditor"]}]}, "policy.rules[1].roles[0]", "not configured"),
        ({"admins": {"principals": ["jwt:root"]}}, "policy.admins.principals[0]", "'jwt'"),
    ],
)
def test_cross_check_errors_name_the_path(cfg: dict[str, Any], path: str, message: str) -> None:
    settings = make_settings(cfg)  # mtls and header configured, jwt not
    with pytest.raises(ConfigError) as err:
        policy.validate(settings)
    assert err.value.path == path and err.value.file == "test.yaml"
    assert message in str(err.value)


def test_check_config_hook_validates_and_describes() -> None:
    pm = make_plugin_manager(entry_points=False)
    notes = [n for batch in pm.hook.sidecrypt_check_config(settings=make_settings()) for n in batch]
    assert any(n.startswith("policy: no rules") for n in notes)
    assert any(n.startswith("identity: mtls, header") for n in notes)
    assert any(n.startswith("warning: server-side mode") for n in notes)
    with pytest.raises(ConfigError):
        pm.hook.sidecrypt_check_config(settings=make_settings({"rules": [{"key": "nope"}]}))


def test_sidecrypt_app_installs_the_engine_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings({"rules": RULES})
    pm = make_plugin_manager(entry_points=False)
    app = web.Application()
    app[appkeys.PLUGIN_MANAGER] = pm
    policy.sidecrypt_app(app, settings)
    assert view(pm, SUPPORT) == ["mask", "mask", "reveal", "drop"]
    with caplog.at_level("WARNING", logger="sidecrypt.plugins.policy"):
        policy.sidecrypt_app(app, make_settings())
    assert any("any caller that reaches the sidecar" in r.message for r in caplog.records)
    assert view(pm, None) == ["reveal"] * 4  # the engine was replaced, not doubled


TIERED: list[dict[str, Any]] = [
    {
        "fields": ["$.ssn", "$.card.number"],
        "roles": ["billing"],
        "purposes": ["*"],
        "mask_for": {"roles": ["support", "billing"]},
        "ciphertext_for": {"principals": ["mtls:stranger"]},
        "drop_for": {"roles": ["intern"]},
        "otherwise": "deny",
    }
]


def test_tiers_give_each_caller_one_view() -> None:
    pm = pm_for(make_settings({"rules": TIERED}))
    intern = Principal("ivy", "mtls", frozenset({"intern"}))
    assert view(pm, BILLING, purpose="invoice")[:2] == ["reveal", "reveal"]
    assert view(pm, BILLING)[:2] == ["mask", "mask"]  # no purpose declared: next tier
    assert view(pm, SUPPORT)[:2] == ["mask", "mask"]
    assert view(pm, STRANGER)[:2] == ["ciphertext", "ciphertext"]
    assert view(pm, intern)[:2] == ["drop", "drop"]
    assert view(pm, None)[:2] == ["deny", "deny"]


def test_tier_refs_are_cross_checked() -> None:
    cfg = {"rules": [{"mask_for": {"roles": ["support", "jwt:x"]}}]}
    with pytest.raises(ConfigError) as err:
        policy.validate(make_settings(cfg))
    assert err.value.path == "policy.rules[0].mask_for.roles[1]"
    with pytest.raises(
        ConfigError, match=r"policy\.rules\[0\]\.drop_for\.roles\[0\]: unknown role"
    ):
        make_settings({"rules": [{"drop_for": {"roles": ["ad:x"]}}]})
