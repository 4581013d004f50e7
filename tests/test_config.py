"""Config: validation errors name the file and the dotted path, never a secret value."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecrypt import config
from sidecrypt.errors import ConfigError

BASE = {"upstream": {"url": "http://127.0.0.1:8080"}}


def _err(raw: object, tmp_path: Path) -> str:
    path = tmp_path / "sidecrypt.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    return str(info.value)


@pytest.mark.parametrize(
    ("raw", "path", "words"),
    [
        ({"upstream": {"url": "not a url"}}, "upstream.url", "not a valid URL"),
        ({**BASE, "listen": {"address": "nowhere"}}, "listen.address", "host:port"),
        ({**BASE, "unknown": 1}, "unknown", "Extra inputs"),
        ({**BASE, "server": {"workers": 0}}, "server.workers", "greater than or equal"),
        (
            {**BASE, "routes": [{"match": {"path": "/x"}, "key": "nope"}]},
            "routes[0].key",
            "unknown key",
        ),
        ({**BASE, "routes": [{"match": {"path": "x"}}]}, "routes[0].match.path", "starts with /"),
        (
            {**BASE, "routes": [{"match": {"path": "/a**"}}]},
            "routes[0].match.path",
            "whole path segment",
        ),
        (
            {
                **BASE,
                "keys": {"k": {"provider": "local"}},
                "routes": [
                    {"match": {"path": "/x"}, "key": "k", "request": {"encrypt": ["$.a[", "$.b"]}}
                ],
            },
            "routes[0].request.encrypt[0].path",
            "unexpected",
        ),
        (
            {**BASE, "routes": [{"match": {"path": "/x"}, "request": {"encrypt": ["$.a"]}}]},
            "routes[0]",
            "needs a key",
        ),
        (
            {**BASE, "routes": [{"match": {"path": "/x"}, "context": {"t": "cookie:x"}}]},
            "routes[0].context",
            "header:NAME",
        ),
        (
            {
                "mode": "client-side",
                "upstream": {"url": "http://remote.example"},
                "listen": {"address": "127.0.0.1:8080"},
            },
            "upstream.url",
            "must be https",
        ),
        (
            {"mode": "client-side", "upstream": {"url": "https://remote.example"}},
            "listen.address",
            "loopback",
        ),
    ],
)
def test_errors_name_file_and_dotted_path(
    raw: object, path: str, words: str, tmp_path: Path
) -> None:
    message = _err(raw, tmp_path)
    assert message.startswith(f"{tmp_path / 'sidecrypt.yaml'}: {path}"), message
    assert words in message


def test_inline_secret_is_refused_without_echoing_it(tmp_path: Path) -> None:
    message = _err({**BASE, "audit": {"file": "-", "hmac_key": "canary-inline-secret"}}, tmp_path)
    assert "audit.hmac_key" in message
    assert "canary-inline-secret" not in message


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("upstream:\n  url: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+"):
        config.load(path, environ={})


def test_env_overrides_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstream: {url: 'http://127.0.0.1:1'}\nlisten: {tls: {cert: c.pem, key: k.pem}}\n"
    )
    settings = config.load(
        path,
        environ={
            "SIDECRYPT_UPSTREAM_URL": "https://app.internal:8443",
            "SIDECRYPT_LISTEN_ADDRESS": "127.0.0.1:9443",
            "SIDECRYPT_LOG_LEVEL": "debug",
        },
    )
    assert settings.upstream.url == "https://app.internal:8443"
    assert settings.listen.address == "127.0.0.1:9443"
    assert settings.log.level == "debug"
    assert settings.listen.tls is not None
    assert settings.listen.tls.cert == tmp_path / "c.pem"


def test_settings_are_frozen() -> None:
    settings = config.parse(BASE)
    with pytest.raises(Exception, match="frozen"):
        settings.mode = "client-side"  # type: ignore[misc]


def test_secret_ref_resolves_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SC_TEST_SECRET", "from-env")
    assert config.SecretRef(env="SC_TEST_SECRET").resolve() == b"from-env"
    (tmp_path / "s").write_text("from-file\n")
    assert config.SecretRef(file=tmp_path / "s").resolve() == b"from-file"
    with pytest.raises(ConfigError, match="SC_TEST_MISSING"):
        config.SecretRef(env="SC_TEST_MISSING").resolve()


@pytest.mark.parametrize(
    ("text", "line", "path"),
    [
        ("upstream: {url: 'http://a'}\nupstream: {url: 'http://b'}\n", 2, "upstream"),
        ("upstream:\n  url: http://a\n  ca: x\n  url: http://b\n", 4, "upstream.url"),
        (
            "upstream: {url: 'http://a'}\nroutes:\n  - match: {path: /a}\n    key: k\n    key: j\n",
            5,
            "routes[0].key",
        ),
    ],
)
def test_duplicate_keys_are_refused_with_line_and_path(
    tmp_path: Path, text: str, line: int, path: str
) -> None:
    cfg = tmp_path / "dup.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(cfg, environ={})
    assert str(info.value).startswith(f"{cfg}: {path}: line {line}: duplicate key")
    assert "http://b" not in str(info.value)  # the values themselves are not echoed


def test_yaml_anchors_and_merge_keys_still_load(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(
        "admin: &a {address: '127.0.0.1:1'}\n"
        "listen: {<<: *a, address: '127.0.0.1:2'}\n"  # a merge, then an override: not a duplicate
        "upstream: {url: 'http://a'}\n"
    )
    settings = config.load(cfg, environ={})
    assert (settings.admin.address, settings.listen.address) == ("127.0.0.1:1", "127.0.0.1:2")


def test_an_invalid_environment_override_names_the_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("upstream: {url: 'http://a'}\n")
    with pytest.raises(ConfigError) as info:
        config.load(cfg, environ={"SIDECRYPT_WORKERS": "abc"})
    message = str(info.value)
    assert message.startswith("environment variable SIDECRYPT_WORKERS (overrides server.workers)")
    assert str(cfg) not in message and "abc" not in message
