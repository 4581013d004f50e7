"""The audit trail: sealing off the request path, files, rotation, resume, block and drop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from sidecrypt import appkeys, config, hookimpl
from sidecrypt.audit_chain import Record, verify_files
from sidecrypt.audit_sinks import FileSink
from sidecrypt.errors import AuditError, ConfigError
from sidecrypt.events import AuditEvent
from sidecrypt.plugin_manager import make_plugin_manager
from sidecrypt.plugins import audit
from sidecrypt.plugins.audit import TRAIL, AuditTrail, audit_healthy, record_events

KEY = b"audit-key-0123456789abcdef"


class CollectSink:
    """A real sink that keeps records in memory; can fail or stall on demand."""

    name = "collect"

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.fail = False
        self.stall: asyncio.Event | None = None
        self.closed = False
        self.writes = 0

    async def write(self, records: Sequence[Record]) -> None:
        self.writes += 1
        if self.stall is not None:
            await self.stall.wait()
        if self.fail:
            raise OSError(28, "No space left on device")
        self.records.extend(records)

    async def close(self) -> None:
        self.closed = True

    def events(self) -> list[dict[str, Any]]:
        return [r.data["event"] for r in self.records if r.kind == "event"]

    def dump(self, path: Path) -> Path:
        path.write_bytes(b"".join(r.line for r in self.records))
        return path


def event(i: int = 0, action: str = "encrypt_fields") -> AuditEvent:
    return AuditEvent(action, key="app", fields=("$.ssn",), count=1, request_id=f"r{i}")


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


async def submit_in_batches(trail: AuditTrail, count: int) -> None:
    """Events r0.. in small batches, so file rotations interleave with writes; then close."""
    await trail.start()
    for i in range(count):
        trail.submit(event(i))
        if i % 10 == 0:
            await until(trail.queue.empty)
    await trail.close()


async def stall_writer(trail: AuditTrail, sink: CollectSink) -> None:
    """Start the trail and submit r1; return once the writer holds it, stalled in write()."""
    await trail.start()
    sink.stall = asyncio.Event()
    writes = sink.writes
    trail.submit(event(1))
    await until(lambda: sink.writes > writes)


# -- the trail on its own ----------------------------------------------------------------------


async def test_events_are_sealed_in_order_and_verify(tmp_path: Path) -> None:
    sink = CollectSink()
    trail = AuditTrail([sink], KEY, checkpoint_interval=60)
    await trail.start()
    for i in range(20):
        trail.submit(event(i))
    await trail.close()
    assert [e["request_id"] for e in sink.events()] == [f"r{i}" for i in range(20)]
    assert sink.records[0].kind == "chain_start" and sink.records[-1].kind == "seal"
    assert [r.seq for r in sink.records] == list(range(1, len(sink.records) + 1))
    assert sink.closed
    assert verify_files([sink.dump(tmp_path / "a.jsonl")], KEY).ok


async def test_idle_writer_writes_a_checkpoint() -> None:
    sink = CollectSink()
    trail = AuditTrail([sink], KEY, checkpoint_interval=0.05)
    await trail.start()
    trail.submit(event())
    await until(lambda: sink.records[-1].kind == "checkpoint")
    await trail.close()
    assert sink.records[-2].data["written"] == 1


async def test_file_sink_resumes_the_chain_across_runs(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for run in range(2):
        trail = AuditTrail([FileSink(path)], KEY)
        await trail.start()
        trail.submit(event(run))
        await trail.close()
    result = verify_files([path], KEY)
    assert result.ok, result.summary()
    starts = [json.loads(line) for line in path.read_text().splitlines()]
    resume = [r for r in starts if r["kind"] == "chain_start"][1]
    assert resume["reason"] == "resume" and resume["previous_sealed"] is True
    assert path.stat().st_mode & 0o777 == 0o600


async def test_unclean_stop_is_flagged_after_resume(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail([FileSink(path)], KEY)
    await trail.start()
    trail.submit(event(1))
    await trail.close()
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-1]))  # no seal
    trail = AuditTrail([FileSink(path)], KEY)
    await trail.start()
    await trail.close()
    result = verify_files([path], KEY)
    assert result.ok and len(result.warnings) == 1 and "without a seal" in result.warnings[0]


async def test_resume_with_another_key_or_damaged_tail_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail([FileSink(path)], KEY)
    await trail.start()
    await trail.close()
    with pytest.raises(AuditError, match="does not authenticate"):
        await AuditTrail([FileSink(path)], b"another-key-0123456789").start()
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AuditError, match="last line"):
        await AuditTrail([FileSink(path)], KEY).start()


async def test_one_writer_per_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditTrail([FileSink(path)], KEY)
    await first.start()
    with pytest.raises(AuditError, match="in use by another process"):
        await AuditTrail([FileSink(path)], KEY).start()
    await first.close()
    second = AuditTrail([FileSink(path)], KEY)  # the lock is released on close
    await second.start()
    await second.close()
    assert verify_files([path], KEY).ok


async def test_record_events_appends_key_administration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDIT_KEY", KEY.decode())
    path = tmp_path / "audit.jsonl"
    settings = config.parse(
        {
            "upstream": {"url": "http://127.0.0.1:9"},
            "audit": {"file": str(path), "hmac_key": {"env": "AUDIT_KEY"}},
        }
    )
    pm = make_plugin_manager([audit], builtins=False, entry_points=False)
    await record_events(settings, pm, [AuditEvent("key_rotate", key="app", key_version=2)])
    await record_events(settings, pm, [AuditEvent("key_create", key="billing", key_version=1)])
    result = verify_files([path], KEY)
    assert result.ok, result.summary()
    actions = [
        orjson.loads(x)["event"]["action"]
        for x in path.read_bytes().splitlines()
        if b'"kind":"event"' in x
    ]
    assert actions == ["key_rotate", "key_create"]


async def test_unwritable_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot open audit file"):
        await AuditTrail([FileSink(tmp_path / "missing" / "a.jsonl")], KEY).start()


async def test_rotation_keeps_the_chain_verifiable(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await submit_in_batches(AuditTrail([FileSink(path, max_bytes=4096)], KEY), 150)
    files = sorted(p for p in tmp_path.glob("audit.jsonl*") if p.suffix != ".lock")
    assert len(files) >= 3
    result = verify_files(reversed(files), KEY)
    assert result.ok, result.summary()
    assert result.complete_start
    events = [
        json.loads(line)["event"]["request_id"]
        for f in result.files
        for line in Path(f).read_text().splitlines()
        if json.loads(line)["kind"] == "event"
    ]
    assert events == [f"r{i}" for i in range(150)]
    newest = verify_files([path], KEY)
    assert newest.ok and not newest.complete_start  # older files not given: stated, not hidden
    first = json.loads(path.read_text().splitlines()[0])
    assert first["kind"] == "chain_start" and first["reason"] == "rotate"


async def test_rotation_keeps_only_keep_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await submit_in_batches(AuditTrail([FileSink(path, max_bytes=4096, keep=2)], KEY), 150)
    assert sorted(p.name for p in tmp_path.glob("audit.jsonl*")) == [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.2",
        "audit.jsonl.lock",
    ]
    assert verify_files([path, f"{path}.1", f"{path}.2"], KEY).ok


async def test_block_refuses_while_the_sink_fails_and_recovers_in_order(tmp_path: Path) -> None:
    sink = CollectSink()
    trail = AuditTrail([sink], KEY, block=True)
    app = web.Application()
    app[TRAIL] = trail
    check = dict(audit.sidecrypt_readiness(app))["audit"]
    await trail.start()
    sink.fail = True
    trail.submit(event(1))
    await until(lambda: not trail.healthy)
    assert not audit_healthy(app) and not trail.accepting()
    with pytest.raises(AuditError, match="sink is failing"):
        trail.submit(event(2))
    trail.submit(event(3, action="request_failed"))  # reporting a refusal never raises
    with pytest.raises(AuditError):
        await check()
    sink.fail = False
    await until(lambda: trail.healthy)
    assert audit_healthy(app)
    await check()
    await trail.close()
    # Event 2 was queued before the refusal: recorded, in order, nothing lost.
    assert [e["request_id"] for e in sink.events()] == ["r1", "r2", "r3"]
    assert verify_files([sink.dump(tmp_path / "a.jsonl")], KEY).ok


async def test_block_refuses_when_the_queue_is_full() -> None:
    sink = CollectSink()
    trail = AuditTrail([sink], KEY, block=True, queue_size=2)
    await stall_writer(trail, sink)
    trail.submit(event(2))
    trail.submit(event(3))
    assert not trail.accepting()
    with pytest.raises(AuditError, match="queue is full"):
        trail.submit(event(4))
    sink.stall.set()
    await trail.close()
    assert [e["request_id"] for e in sink.events()] == ["r1", "r2", "r3"]


async def test_drop_counts_and_records_the_drop(tmp_path: Path) -> None:
    sink = CollectSink()
    trail = AuditTrail([sink], KEY, block=False, queue_size=2)
    await stall_writer(trail, sink)
    for i in range(2, 12):
        trail.submit(event(i))  # never raises
    assert trail.accepting()
    assert trail.dropped == 8
    sink.stall.set()
    await trail.close()
    drops = [r.data for r in sink.records if r.kind == "drop"]
    assert drops and drops[0]["dropped"] == 8
    assert verify_files([sink.dump(tmp_path / "a.jsonl")], KEY).ok


# -- the plugin in an app ----------------------------------------------------------------------


class SinkPlugin:
    def __init__(self, sink: CollectSink) -> None:
        self.sink = sink

    @hookimpl
    def sidecrypt_audit_sinks(self, settings: config.Settings) -> list[Any]:
        return [self.sink]


def make_app(raw_audit: dict[str, Any], *extra: object) -> web.Application:
    settings = config.parse({"upstream": {"url": "http://127.0.0.1:9"}, "audit": raw_audit})
    pm = make_plugin_manager([audit, *extra], builtins=False, entry_points=False)
    app = web.Application()
    app[appkeys.PLUGIN_MANAGER] = pm
    pm.hook.sidecrypt_app(app=app, settings=settings)
    return app


async def test_each_app_has_its_own_trail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aiohttp_client: Any
) -> None:
    monkeypatch.setenv("AUDIT_KEY", KEY.decode())
    key = {"env": "AUDIT_KEY"}
    first = make_app({"file": str(tmp_path / "one.jsonl"), "hmac_key": key})
    second = make_app({"file": str(tmp_path / "two.jsonl"), "hmac_key": key})
    await aiohttp_client(first)
    client = await aiohttp_client(second)
    first[appkeys.PLUGIN_MANAGER].hook.sidecrypt_audit(event=event(1))
    second[appkeys.PLUGIN_MANAGER].hook.sidecrypt_audit(event=event(2))
    assert first[appkeys.AUDIT_GATE]() and audit_healthy(second)
    await first[TRAIL].close()
    await client.close()
    one = [orjson.loads(x) for x in (tmp_path / "one.jsonl").read_bytes().splitlines()]
    two = [orjson.loads(x) for x in (tmp_path / "two.jsonl").read_bytes().splitlines()]
    assert [r["event"]["request_id"] for r in one if r["kind"] == "event"] == ["r1"]
    assert [r["event"]["request_id"] for r in two if r["kind"] == "event"] == ["r2"]
    assert verify_files([tmp_path / "one.jsonl"], KEY).ok


async def test_audit_off_without_sinks() -> None:
    app = make_app({})
    assert TRAIL not in app and audit_healthy(app)
    app[appkeys.PLUGIN_MANAGER].hook.sidecrypt_audit(event=event())  # a no-op, no error


def test_a_sink_without_hmac_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"audit\.hmac_key: required"):
        make_app({}, SinkPlugin(CollectSink()))
    with pytest.raises(ConfigError, match=r"audit\.hmac_key: required"):
        config.parse({"upstream": {"url": "http://a.test"}, "audit": {"file": "-"}})


def test_unset_or_short_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_AUDIT_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"audit\.hmac_key: environment variable NO_SUCH"):
        make_app({"file": "-", "hmac_key": {"env": "NO_SUCH_AUDIT_KEY"}})
    monkeypatch.setenv("SHORT_AUDIT_KEY", "short")
    with pytest.raises(ConfigError, match="at least 16 bytes") as info:
        make_app({"file": "-", "hmac_key": {"env": "SHORT_AUDIT_KEY"}})
    assert "short" not in str(info.value).replace("SHORT_AUDIT_KEY", "")


async def test_stdout_sink_writes_chained_lines(
    monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    monkeypatch.setenv("AUDIT_KEY", KEY.decode())
    app = make_app({"file": "-", "hmac_key": {"env": "AUDIT_KEY"}})
    trail = app[TRAIL]
    await trail.start()
    trail.submit(event(7))
    await trail.close()
    out = capfdbinary.readouterr().out
    (tmp_path / "stdout.jsonl").write_bytes(out)
    assert verify_files([tmp_path / "stdout.jsonl"], KEY).ok
    assert b'"request_id":"r7"' in out


# -- through the proxy ---------------------------------------------------------------------------

ROUTE = {
    "match": {"methods": ["POST"], "path": "/users/**"},
    "key": "app",
    "context": {"tenant": "header:X-Tenant"},
    "request": {"encrypt": ["$.ssn", "$.card.number"]},
    "response": {"decrypt": ["$.ssn", "$.card.number"]},
}


def proxy_config(tmp_path: Path, upstream_url: str, **audit_opts: Any) -> dict[str, Any]:
    from sidecrypt.keyring import create_key

    ring = tmp_path / "keyring.json"
    if not ring.exists():
        create_key(ring, "app")
    return {
        "upstream": {"url": upstream_url},
        "keys": {"app": {"provider": "local", "keyring": str(ring), "reload_interval": 0}},
        "audit": {
            "file": str(tmp_path / "audit.jsonl"),
            "hmac_key": {"env": "AUDIT_KEY"},
            "checkpoint_interval": 0.05,
            **audit_opts,
        },
        "routes": [ROUTE],
    }


def summary(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["action"], e.get("count", 0), e.get("outcome")) for e in events]


Started = tuple[Any, CollectSink]


@pytest.fixture
def audited_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: Any, proxy_factory: Any
) -> Callable[..., Awaitable[Started]]:
    """Start the proxy (plain http) with the file trail and a collecting sink."""
    monkeypatch.setenv("AUDIT_KEY", KEY.decode())

    async def start(**audit_opts: Any) -> Started:
        sink = CollectSink()
        raw = proxy_config(tmp_path, upstream.url, **audit_opts)
        return await proxy_factory(raw, tls=False, plugins=(SinkPlugin(sink),)), sink

    return start


async def break_sink(proxy: Any, sink: CollectSink) -> AuditTrail:
    """A key use elsewhere whose write fails: returns the trail once it reports unhealthy."""
    trail: AuditTrail = proxy.running.runners[0].app[TRAIL]
    sink.fail = True
    trail.submit(event(0))
    await until(lambda: not trail.healthy)
    return trail


def post_user(session: Any, proxy: Any, body: Any, tenant: str = "t") -> Any:
    return session.post(f"{proxy.url}/users/1", json=body, headers={"X-Tenant": tenant})


async def test_every_key_use_gives_exactly_the_expected_events(
    tmp_path: Path, audited_proxy: Callable[..., Awaitable[Started]]
) -> None:
    import aiohttp

    proxy, sink = await audited_proxy()
    body = {"ssn": "123-45-6789", "card": {"number": "4111"}, "name": "Ann"}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with post_user(session, proxy, body, tenant="t1") as resp:
                assert resp.status == 200, await resp.text()
                assert await resp.json() == body
    first = [
        ("generate_data_key", 0, "ok"),
        ("encrypt_fields", 2, "ok"),
        ("decrypt_data_key", 0, "ok"),
        ("decrypt_fields", 2, "ok"),
        ("reveal", 2, "revealed"),  # one reveal event per outcome (no policy: reveal)
    ]
    cached = [  # the data keys come from the cache: no provider call, no key event
        ("encrypt_fields", 2, "ok"),
        ("decrypt_fields", 2, "ok"),
        ("reveal", 2, "revealed"),
    ]
    await until(lambda: len(sink.events()) >= 8)
    await asyncio.sleep(0.05)  # nothing more arrives
    events = sink.events()
    assert summary(events) == first + cached
    req = events[1]
    assert req["fields"] == ["$.ssn", "$.card.number"] and req["route"] == "POST /users/**"
    assert req["key"] == "app" and req["provider"] == "local" and req["context"] == {"tenant": "t1"}
    assert req["request_id"] and events[0]["cache"] == "miss"
    # The file trail holds the same events and verifies while the proxy runs (after a checkpoint).
    path = tmp_path / "audit.jsonl"
    await until(lambda: b'"kind":"checkpoint"' in path.read_bytes().splitlines()[-1])
    result = verify_files([path], KEY)
    assert result.ok, result.summary()
    stored = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert summary([r["event"] for r in stored if r["kind"] == "event"]) == first + cached


async def test_block_with_failing_sink_refuses_with_503_and_forwards_nothing(
    upstream: Any, audited_proxy: Callable[..., Awaitable[Started]]
) -> None:
    import aiohttp

    proxy, sink = await audited_proxy(on_failure="block")
    trail = await break_sink(proxy, sink)
    async with aiohttp.ClientSession() as session:
        async with post_user(session, proxy, {"ssn": "1"}) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "audit_unavailable"
        async with session.get(f"{proxy.admin_url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["checks"]["audit"]["ok"] is False
    assert upstream.seen == []
    sink.fail = False
    await until(lambda: trail.healthy)
    async with aiohttp.ClientSession() as session, post_user(session, proxy, {"ssn": "1"}) as resp:
        assert resp.status == 200
    assert len(upstream.seen) == 1


async def test_drop_keeps_serving_and_counts_drops(
    upstream: Any, audited_proxy: Callable[..., Awaitable[Started]]
) -> None:
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    proxy, sink = await audited_proxy(on_failure="drop", queue_size=1)
    trail = await break_sink(proxy, sink)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with post_user(session, proxy, {"ssn": "1"}) as resp:
                assert resp.status == 200
        async with session.get(f"{proxy.admin_url}/readyz") as resp:
            assert resp.status == 200
        async with session.get(f"{proxy.admin_url}/metrics") as resp:
            text = await resp.text()
    assert len(upstream.seen) == 3
    dropped = {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "sidecrypt_audit_dropped_total"
    }
    assert dropped["sidecrypt_audit_dropped_total"] >= 3
    assert trail.dropped == dropped["sidecrypt_audit_dropped_total"]
    sink.fail = False
    await until(lambda: any(r.kind == "drop" for r in sink.records))


async def test_canary_values_never_leak(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    upstream: Any,
    proxy_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Distinctive plaintext and key values appear in no log, audit record, metric or error."""
    import logging

    import aiohttp

    caplog.set_level(logging.DEBUG)
    audit_key = "CANARY-AUDIT-KEY-5c1d0e7f"
    monkeypatch.setenv("AUDIT_KEY", audit_key)
    raw = proxy_config(tmp_path, upstream.url)
    materials = [
        v["material"]
        for k in json.loads((tmp_path / "keyring.json").read_text())["keys"].values()
        for v in k["versions"]
    ]
    ssn, card = "CANARY-SSN-918273", "CANARY-CARD-4111999"
    canaries = [ssn, card, audit_key, *materials]
    proxy = await proxy_factory(raw, tls=False)
    bodies = []
    async with aiohttp.ClientSession() as session:
        url = f"{proxy.url}/users/1"
        headers = {"X-Tenant": "t1"}
        async with session.post(
            url, json={"ssn": ssn, "card": {"number": card}}, headers=headers
        ) as r:
            assert r.status == 200
            assert (await r.json())["ssn"] == ssn  # the full cycle really ran
        broken = b'{"ssn": "' + ssn.encode() + b'", '  # malformed JSON with a value inside
        async with session.post(
            url, data=broken, headers={**headers, "Content-Type": "application/json"}
        ) as r:
            assert r.status == 400
            bodies.append(await r.text())
        async with session.get(f"{proxy.admin_url}/metrics") as r:
            bodies.append(await r.text())
    path = tmp_path / "audit.jsonl"
    await until(lambda: b'"kind":"checkpoint"' in path.read_bytes().splitlines()[-1])
    trail = path.read_text()
    assert '"encrypt_fields"' in trail and '"decrypt_fields"' in trail
    assert all(ssn not in up.body.decode() for up in upstream.seen)
    logs = "\n".join(repr(r.__dict__) + r.getMessage() for r in caplog.records)
    for canary in canaries:
        assert canary not in trail
        assert canary not in logs
        for body in bodies:
            assert canary not in body
