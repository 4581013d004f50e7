"""Request ids: a valid client X-Request-Id is kept (else sidecrypt makes one), sent upstream,
returned to the client (also on error answers, in the body too) and written in the audit record
and the log; one id per request whatever the upstream sends back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecrypt import hookimpl
from sidecrypt.events import AuditEvent
from sidecrypt.keyring import create_key


class Recorder:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    @hookimpl
    def sidecrypt_audit(self, event: AuditEvent) -> None:
        self.events.append(event)


@pytest.fixture
async def env(tmp_path: Path, upstream_factory: Any, proxy_factory: Any) -> Any:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        # An upstream that sets its own id: the client still sees exactly one, sidecrypt's.
        return web.Response(body=body or b"{}", headers={"X-Request-Id": "upstream-own"})

    up = await upstream_factory(answer)
    create_key(tmp_path / "keyring.json", "app")
    recorder = Recorder()
    raw = {
        "upstream": {"url": up.url},
        "keys": {"app": {"provider": "local", "keyring": "keyring.json"}},
        "routes": [
            {
                "match": {"methods": ["POST"], "path": "/users"},
                "key": "app",
                "request": {"encrypt": ["$.ssn"]},
            }
        ],
    }
    proxy = await proxy_factory(raw, tls=False, base_dir=tmp_path, plugins=(recorder,))
    async with aiohttp.ClientSession() as session:
        yield proxy, up, recorder, session


def upstream_ids(up: Any) -> list[str]:
    return [v for k, v in up.seen[-1].headers if k.lower() == "x-request-id"]


@pytest.mark.parametrize("path", ["/plain", "/users"])
async def test_a_valid_client_id_travels_end_to_end(env: Any, path: str) -> None:
    proxy, up, recorder, session = env
    rid = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with session.post(
        f"{proxy.url}{path}", json={"ssn": "1"}, headers={"X-Request-Id": rid}
    ) as resp:
        assert resp.status == 200
        assert resp.headers.getall("X-Request-Id") == [rid]
    assert upstream_ids(up) == [rid]
    if path == "/users":
        assert {e.request_id for e in recorder.events if e.action == "encrypt_fields"} == {rid}


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "a\u00e9b", "<script>"])
async def test_an_invalid_id_is_replaced(env: Any, given: str) -> None:
    proxy, up, _, session = env
    headers = {"X-Request-Id": given} if given.isascii() else {}
    async with session.get(f"{proxy.url}/plain", headers=headers) as resp:
        (rid,) = resp.headers.getall("X-Request-Id")
    assert rid != given and rid != "upstream-own"
    assert upstream_ids(up) == [rid]


async def test_error_answers_carry_the_id_in_header_body_log_and_audit(
    env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, up, recorder, session = env
    caplog.set_level(logging.INFO)
    async with session.post(
        f"{proxy.url}/users",
        data=b"{not json",
        headers={"Content-Type": "application/json", "X-Request-Id": "req-7"},
    ) as resp:
        assert resp.status == 400
        assert resp.headers["X-Request-Id"] == "req-7"
        assert (await resp.json())["error"]["request_id"] == "req-7"
    assert not up.seen
    (failed,) = [e for e in recorder.events if e.action == "request_failed"]
    assert failed.request_id == "req-7" and failed.error == "malformed_json"
    assert any(getattr(r, "request_id", None) == "req-7" for r in caplog.records)
