"""The core's per-request decisions: hooks only, fail closed, and masking a plugin can replace.

``purpose_of`` is covered in tests/plugins/test_policy.py (re-exported there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pluggy
import pytest
from tests.conftest import Upstream

from sidecrypt import config, hookimpl
from sidecrypt.decisions import Decider, default_mask
from sidecrypt.errors import PluginError
from sidecrypt.identity import Principal
from sidecrypt.keyring import create_key
from sidecrypt.plugin_manager import make_plugin_manager
from sidecrypt.plugins import policy

ROUTE = "GET /users/*"
SSN = "123-45-6789"
CARD = "4111111111111111"


class EmailMask:
    """A third-party masking plugin: its own form for one field, no opinion on the rest."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, str]] = []

    @hookimpl
    def sidecrypt_mask(self, route: str, key: str | None, field: str, value: Any) -> str | None:
        self.seen.append((route, key, field))
        return f"<{field} hidden>" if field == "$.ssn" else None


class Answer:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    @hookimpl
    def sidecrypt_authorize(self, **_: Any) -> Any:
        return self.outcome


def settings_with(policy_cfg: dict[str, Any]) -> config.Settings:
    return config.parse({"upstream": {"url": "http://127.0.0.1:9"}, "policy": policy_cfg})


def pm_with(*plugins: object, policy_cfg: dict[str, Any] | None = None) -> pluggy.PluginManager:
    pm = make_plugin_manager(plugins, entry_points=False)
    if policy_cfg is not None:
        policy.install(pm, settings_with(policy_cfg))
    return pm


def test_no_policy_installed_fails_closed_and_masks_by_default() -> None:
    decide = Decider(pm_with(), None, ROUTE, "app", None)
    assert decide("$.ssn") == "ciphertext"
    assert decide.mask("$.ssn", SSN) == default_mask(SSN) == "****6789"
    assert decide.mask("$.pin", "1234") == "****"  # short strings keep nothing
    assert decide.mask("$.card", {"number": CARD}) == "****"


def test_unknown_outcome_is_a_plugin_error() -> None:
    decide = Decider(pm_with(Answer("maybe")), None, ROUTE, "app", None)
    with pytest.raises(PluginError, match=r"\$\.ssn"):
        decide("$.ssn")


def test_decisions_are_cached_per_label() -> None:
    answer = Answer("reveal")
    decide = Decider(pm_with(answer), None, ROUTE, "app", None)
    assert decide("$.ssn") == "reveal"
    answer.outcome = "deny"
    assert decide("$.ssn") == "reveal" and not decide.denied
    assert decide("$.card") == "deny" and decide.denied


def test_route_wide_answer_when_no_rule_can_apply() -> None:
    """The built-in policy answers once per request for a route none of its rules name; every
    field is still decided, recorded and audited one by one, and rules elsewhere still bite."""
    rules = [{"route": "GET /other/*", "roles": ["ops"], "otherwise": "deny"}]
    pm = pm_with(policy_cfg={"default": "mask", "rules": rules})
    engine = next(p for p in pm.get_plugins() if isinstance(p, policy.PolicyEngine))
    assert engine.uniform_outcome(None, ROUTE, "app", None) == "mask"
    assert engine.uniform_outcome(None, "GET /other/*", "app", None) is None
    decide = Decider(pm, None, ROUTE, "app", "audit")
    assert [decide(f) for f in ("$.ssn", "$.card", "$.ssn")] == ["mask", "mask", "mask"]
    assert decide.decisions == {"$.ssn": "mask", "$.card": "mask"}
    [event] = decide.audit_events(request_id="r1")
    assert (event.action, event.outcome, event.fields, event.count) == (
        "reveal",
        "masked",
        ("$.ssn", "$.card"),
        2,
    )
    assert (event.route, event.key, event.purpose, event.request_id) == (
        ROUTE,
        "app",
        "audit",
        "r1",
    )
    other = Decider(pm, None, "GET /other/*", "app", None)
    assert other("$.ssn") == "deny"
    # Another authorize implementation: no route-wide shortcut, its answers are asked per field.
    pm.register(Answer("ciphertext"))
    assert Decider(pm, None, ROUTE, "app", None)("$.ssn") == "ciphertext"


def test_built_in_policy_masks_through_the_hook() -> None:
    pm = pm_with(policy_cfg={"default": "mask", "mask": {"keep_last": 2, "char": "#"}})
    decide = Decider(pm, None, ROUTE, "app", None)
    assert decide("$.ssn") == "mask"
    assert decide.mask("$.ssn", SSN) == "#########89"


def test_third_party_sidecrypt_mask_wins_over_the_built_in_policy() -> None:
    plugin = EmailMask()
    pm = pm_with(plugin, policy_cfg={"default": "mask", "mask": {"keep_last": 2, "char": "#"}})
    decide = Decider(pm, Principal("x", "mtls"), ROUTE, "app", None)
    assert decide.mask("$.ssn", SSN) == "<$.ssn hidden>"
    assert decide.mask("$.card", CARD) == "#" * 14 + "11"  # no opinion: the policy's mask
    assert plugin.seen == [(ROUTE, "app", "$.ssn"), (ROUTE, "app", "$.card")]


def test_a_non_string_mask_is_a_plugin_error() -> None:
    class Bad:
        @hookimpl
        def sidecrypt_mask(self, **_: Any) -> Any:
            return 6789

    decide = Decider(pm_with(Bad()), None, ROUTE, "app", None)
    with pytest.raises(PluginError, match="non-string"):
        decide.mask("$.ssn", SSN)


async def test_a_plugins_mask_reaches_the_response(
    tmp_path: Path, upstream: Upstream, proxy_factory: Any
) -> None:
    create_key(tmp_path / "keyring.json", "app")
    fields = ["$.ssn", "$.card"]
    raw = {
        "mode": "client-side",
        "allow_plain_upstream": True,
        "listen": {"address": "127.0.0.1:0"},
        "upstream": {"url": upstream.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json", "key": "app"}},
        "policy": {"default": "mask"},
        "routes": [
            {
                "match": {"path": "/users/*"},
                "key": "app",
                "request": {"encrypt": fields},
                "response": {"decrypt": fields},
            }
        ],
    }
    plugin = EmailMask()
    proxy = await proxy_factory(raw, tls=False, plugins=(plugin,), base_dir=tmp_path)
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{proxy.url}/users/7", json={"ssn": SSN, "card": CARD}) as resp,
    ):
        assert resp.status == 200
        doc = await resp.json()  # the echoed ciphertext, decrypted and masked on the way back
    assert doc == {"ssn": "<$.ssn hidden>", "card": "*" * 12 + "1111"}
    assert SSN.encode() not in upstream.all_bytes() and CARD.encode() not in upstream.all_bytes()
    assert [f for _, _, f in plugin.seen] == ["$.ssn", "$.card"]


class Args:
    """Records the arguments each field's question carries; answers by field."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.seen: list[tuple[Any, ...]] = []

    @hookimpl
    def sidecrypt_authorize(
        self, principal: Any, action: str, route: str, field: str, key: Any, purpose: Any
    ) -> str:
        self.seen.append((principal, action, route, field, key, purpose))
        return self.answers[field]


def test_each_field_is_asked_with_its_own_arguments_and_audited_by_outcome() -> None:
    who = Principal(id="alice", source="jwt")
    answers = {"$.a": "mask", "$.b": "reveal", "$.c": "mask", "$.d": "drop"}
    plugin = Args(answers)
    decide = Decider(pm_with(plugin), who, ROUTE, "app", "audit")
    assert decide.audit_events(request_id="r0") == []  # nothing decided, nothing to record
    assert [decide(f) for f in answers] == list(answers.values())
    assert plugin.seen == [(who, "decrypt", ROUTE, f, "app", "audit") for f in answers]
    events = decide.audit_events(request_id="r1", context={"tenant": "acme"})
    # One event per outcome, in order of first appearance, each naming its fields in order.
    assert [(e.outcome, e.fields, e.count) for e in events] == [
        ("masked", ("$.a", "$.c"), 2),
        ("revealed", ("$.b",), 1),
        ("dropped", ("$.d",), 1),
    ]
    for e in events:
        assert (e.action, e.route, e.key, e.principal, e.purpose) == (
            "reveal",
            ROUTE,
            "app",
            "jwt:alice",
            "audit",
        )
        assert (e.request_id, e.context) == ("r1", {"tenant": "acme"})
