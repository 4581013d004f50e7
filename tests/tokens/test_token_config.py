"""The ``tokenize``/``detokenize`` rules, ``lookup`` and ``tokens:`` in the config: refusals
name the file and dotted path and say why, and never echo a value."""

from __future__ import annotations

from typing import Any

import pytest

from sidecrypt import config
from sidecrypt.errors import ConfigError
from sidecrypt.proxy.routes import Router


def _raw(route: dict[str, Any], **top: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "keys": {"app": {"provider": "local", "keyring": "k.json"}},
        "stores": {"vault": {"type": "sqlite", "path": "v.db"}},
        "routes": [{"match": {"path": "/users/{id}"}, "key": "app", **route}],
    }
    base.update(top)
    return base


def test_a_valid_config_compiles() -> None:
    settings = config.parse(
        _raw(
            {
                "lookup": {"path": {"id": {"format": "digits", "consistent": True}}},
                "request": {"tokenize": [{"path": "$.ssn", "format": "ssn", "consistent": True}]},
                "response": {
                    "detokenize": [{"path": "$..ssn", "format": "ssn", "consistent": True}]
                },
            }
        )
    )
    assert settings.vault_store == "vault"
    route = Router(settings.routes, default_max_body=1 << 20).routes[0]
    assert route.needs_request_body and route.needs_response_body
    assert route.tokens.lookups and route.tokens.path[0][:2] == ("id", 2)


@pytest.mark.parametrize(
    ("route", "top", "where", "why"),
    [
        (
            {
                "request": {
                    "tokenize": [
                        {"path": "$.n", "format": "digits", "keep_first": 2, "keep_last": 2}
                    ]
                }
            },
            {},
            "routes[0].request.tokenize[0]",
            "leaves 100 possible tokens",
        ),
        (
            {"response": {"detokenize": [{"path": "$.c", "format": "card", "luhn": "never"}]}},
            {},
            "routes[0].response.detokenize[0].luhn",
            "Input should be",
        ),
        (
            {"request": {"tokenize": [{"path": "$.x", "format": "rot13"}]}},
            {},
            "routes[0].request.tokenize[0]",
            "unknown token format 'rot13'",
        ),
        (
            {"request": {"tokenize": [{"path": "$[", "format": "ssn"}]}},
            {},
            "routes[0].request.tokenize[0].path",
            "",
        ),
        (
            {"lookup": {"query": {"email": {"format": "email"}}}},
            {},
            "routes[0].lookup",
            "needs consistent: true",
        ),
        (
            {"lookup": {"path": {"ssn": {"format": "ssn", "consistent": True}}}},
            {},
            "routes[0]",
            "the pattern has no {ssn}",
        ),
        (
            {"request": {"tokenize": [{"path": "$.ssn", "format": "ssn"}]}},
            {"stores": {}},
            "tokens.store",
            "name the vault's store",
        ),
        (
            {"request": {"tokenize": [{"path": "$.ssn", "format": "ssn"}]}},
            {"tokens": {"store": "elsewhere"}},
            "tokens.store",
            "unknown store 'elsewhere'",
        ),
    ],
)
def test_refusals_name_the_place_and_the_reason(
    route: dict[str, Any], top: dict[str, Any], where: str, why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(_raw(route, **top), file="s.yaml")
    message = info.value.message
    assert message.startswith(f"s.yaml: {where}"), message
    assert why in message


def test_a_per_tenant_branch_key_cannot_hold_tokens() -> None:
    raw = _raw({"request": {"tokenize": [{"path": "$.ssn", "format": "ssn"}]}})
    raw["keys"]["app"]["hierarchy"] = {"store": "vault", "per": "tenant"}
    with pytest.raises(ConfigError, match=r"routes\[0\]\.key: .*branch key per 'tenant'"):
        config.parse(raw)


def test_token_rules_need_a_key() -> None:
    raw = _raw({"request": {"tokenize": [{"path": "$.ssn", "format": "ssn"}]}})
    del raw["routes"][0]["key"]
    with pytest.raises(ConfigError, match="needs a key"):
        config.parse(raw)
