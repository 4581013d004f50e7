"""Built-in audit plugin: a per-app trail sealing events into the HMAC chain off the request path.

State is per app, never module-global: ``sidecrypt_app`` builds an :class:`AuditTrail`, stores it
at ``app[TRAIL]``, registers a small per-app plugin object on the app's plugin manager that
implements ``sidecrypt_audit`` for that app, and adds a cleanup context that runs the background
writer. ``app[appkeys.AUDIT_GATE]`` is the fast per-request check the proxy calls.

``audit.on_failure: block``: when a sink fails or the queue is full, the gate says no and
``sidecrypt_audit`` raises :class:`AuditError` (503), so the proxy refuses rather than act
unaudited; queued records are retried in order until the sink recovers. ``drop``: events that do
not fit in the queue are counted (``dropped``) and a ``drop`` record in the chain says how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pluggy
from aiohttp import web

from .. import appkeys, hookimpl
from ..audit_chain import MIN_KEY_BYTES, AuditSink, Chain, Record
from ..audit_sinks import FileSink, StdoutSink
from ..config import Settings
from ..errors import AuditError, ConfigError
from ..events import AuditEvent

log = logging.getLogger(__name__)

BATCH_MAX = 512
CLOSE_TIMEOUT = 5.0
NEVER_REFUSE = frozenset({"request_failed"})


class AuditTrail:
    """Bounded queue, one background writer, one chain shared by every sink."""

    def __init__(
        self,
        sinks: Sequence[AuditSink],
        key: bytes,
        *,
        block: bool = True,
        queue_size: int = 10_000,
        checkpoint_interval: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sinks = list(sinks)
        self.chain = Chain(key)
        self.block = block
        self.queue: asyncio.Queue[AuditEvent | None] = asyncio.Queue(queue_size)
        self.checkpoint_interval = checkpoint_interval
        self.clock = clock
        self.healthy = True
        self.dropped = 0
        self.written = 0
        self.sink_errors = 0
        self._unnoted_drops = 0
        self._dirty = False
        self._last_checkpoint = 0.0
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"AuditTrail(sinks={[s.name for s in self.sinks]}, seq={self.chain.seq})"

    # -- request path (sync, never blocks) ------------------------------------------------------

    def accepting(self) -> bool:
        """The per-request gate: False means refuse with 503 (only ever False with ``block``)."""
        return not self.block or (self.healthy and not self._closed and not self.queue.full())

    def submit(self, event: AuditEvent) -> None:
        """Queue an event. With ``block`` a key use that cannot be recorded raises AuditError;
        a ``request_failed`` event never raises (it reports a refusal, refusing again helps
        nobody)."""
        if self._closed:
            self._drop()
            return
        refuse = self.block and event.action not in NEVER_REFUSE
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            if refuse:
                raise AuditError("the audit queue is full; refusing to act unaudited") from None
            self._drop()
            return
        if refuse and not self.healthy:
            raise AuditError("the audit sink is failing; refusing to act unaudited")

    def _drop(self) -> None:
        self.dropped += 1
        self._unnoted_drops += 1

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            for sink in self.sinks:  # release files and locks of a trail that never ran
                with contextlib.suppress(Exception):
                    await sink.close()
            raise

    async def _start(self) -> None:
        resume: dict[str, Any] | None = None
        where = ""
        for sink in self.sinks:
            opener = getattr(sink, "open", None)
            if opener is not None:
                last = await opener()
                if resume is None and last is not None:
                    resume = last
                    where = sink.name
        body: dict[str, Any] = {"reason": "start", "key_id": self.chain.key_id}
        if resume is not None:
            if not self.chain.authentic(resume):
                raise AuditError(
                    f"audit sink {where}: its last record does not authenticate under "
                    "audit.hmac_key (another key, or a damaged record); verify it and move it aside"
                )
            self.chain.seq, self.chain.prev = resume["seq"], resume["mac"]
            body.update(reason="resume", previous_sealed=resume.get("kind") == "seal")
        await self._emit([self._seal("chain_start", body)], retry=False)
        self._last_checkpoint = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="sidecrypt-audit-writer")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                log.error("audit writer did not finish: %d events unwritten", self.queue.qsize())
            else:
                with contextlib.suppress(AuditError, OSError):
                    await self._emit([self._seal("seal", {"reason": "shutdown"})], retry=False)
                log.info("audit trail sealed at seq %d mac %s", self.chain.seq, self.chain.prev)
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception:
                log.exception("closing audit sink %s failed", sink.name)

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        await self.start()
        yield
        await self.close()

    # -- the writer -----------------------------------------------------------------------------

    def _seal(self, kind: str, body: dict[str, Any]) -> Record:
        return self.chain.seal(kind, body, now=self.clock())

    async def _run(self) -> None:
        queue = self.queue
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                if self._closed:
                    return
                timeout = None
                if self._dirty:
                    timeout = max(
                        0.0, self._last_checkpoint + self.checkpoint_interval - time.monotonic()
                    )
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    await self._checkpoint()
                    continue
            events = [] if item is None else [item]
            while len(events) < BATCH_MAX and not queue.empty():
                nxt = queue.get_nowait()
                if nxt is not None:
                    events.append(nxt)
            records = []
            if self._unnoted_drops:
                records.append(self._seal("drop", {"dropped": self._unnoted_drops}))
                self._unnoted_drops = 0
            records.extend(self._seal("event", {"event": e.to_dict()}) for e in events)
            if records:
                await self._emit(records)
                self.written += len(events)
                self._dirty = True
                if time.monotonic() - self._last_checkpoint >= self.checkpoint_interval:
                    await self._checkpoint()
            await self._maybe_rotate()

    async def _checkpoint(self) -> None:
        await self._emit([self._seal("checkpoint", {"written": self.written})])
        self._dirty = False
        self._last_checkpoint = time.monotonic()

    async def _maybe_rotate(self) -> None:
        rotating = [s for s in self.sinks if getattr(s, "wants_rotation", lambda: False)()]
        if not rotating:
            return
        await self._emit([self._seal("seal", {"reason": "rotate"})])
        for sink in rotating:
            await sink.rotate()  # type: ignore[attr-defined]
        body = {"reason": "rotate", "key_id": self.chain.key_id}
        await self._emit([self._seal("chain_start", body)])

    async def _emit(self, records: list[Record], *, retry: bool = True) -> None:
        """Write to every sink; retry failing sinks with the same records until they succeed."""
        pending = self.sinks
        delay = 0.05
        while True:
            failed = []
            for sink in pending:
                try:
                    await sink.write(records)
                except Exception as exc:
                    failed.append(sink)
                    self.sink_errors += 1
                    level = logging.ERROR if self.healthy else logging.DEBUG  # once per outage
                    log.log(level, "audit sink %s failed: %s", sink.name, type(exc).__name__)
                    if not retry:
                        raise AuditError(f"audit sink {sink.name} cannot write") from None
            if not failed:
                if not self.healthy:
                    log.warning("audit sinks write again")
                self.healthy = True
                return
            self.healthy = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            pending = failed


TRAIL: web.AppKey[AuditTrail] = web.AppKey("sidecrypt.audit_trail", AuditTrail)


class _TrailPlugin:
    """Per-app implementation of ``sidecrypt_audit``, registered on that app's manager."""

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    @hookimpl
    def sidecrypt_audit(self, event: AuditEvent) -> None:
        self.trail.submit(event)


def audit_healthy(app: web.Application) -> bool:
    """Sync, fast: may this app use keys now? True when audit is off or ``on_failure: drop``."""
    trail = app.get(TRAIL)
    return trail is None or trail.accepting()


def audit_stats(app: web.Application) -> dict[str, float] | None:
    """Figures for metrics: queue depth, drops, written, sink errors, healthy (1/0)."""
    trail = app.get(TRAIL)
    if trail is None:
        return None
    return {
        "queue_depth": trail.queue.qsize(),
        "queue_capacity": trail.queue.maxsize,
        "dropped": trail.dropped,
        "written": trail.written,
        "sink_errors": trail.sink_errors,
        "healthy": 1.0 if trail.healthy else 0.0,
    }


def hmac_key(settings: Settings) -> bytes:
    """Resolve ``audit.hmac_key``; a clear config error when it is missing or too short."""
    ref = settings.audit.hmac_key
    path = "audit.hmac_key"
    if ref is None:
        raise ConfigError(
            "required when an audit sink is configured (the trail is HMAC-chained)",
            file=settings.source,
            path=path,
        )
    try:
        key = ref.resolve()
    except ConfigError as exc:
        raise ConfigError(exc.message, file=settings.source, path=path) from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"the audit key must have at least {MIN_KEY_BYTES} bytes",
            file=settings.source,
            path=path,
        )
    return key


async def record_events(
    settings: Settings, pm: pluggy.PluginManager, events: Sequence[AuditEvent]
) -> None:
    """Append events outside a running proxy (CLI key administration: key_create, key_rotate).

    Opens the configured sinks, continues the chain, seals and closes. Raises AuditError when
    the file is held by a running proxy (one writer per file).
    """
    sinks = [s for batch in pm.hook.sidecrypt_audit_sinks(settings=settings) for s in batch or ()]
    if not sinks:
        return
    trail = AuditTrail(sinks, hmac_key(settings), block=True, queue_size=max(1, len(events)))
    await trail.start()
    try:
        for ev in events:
            trail.submit(ev)
    finally:
        await trail.close()


@hookimpl(trylast=True)
def sidecrypt_audit_sinks(settings: Settings) -> list[AuditSink]:
    audit = settings.audit
    if audit.file is None:
        return []
    if audit.file == "-":
        return [StdoutSink()]
    path = Path(audit.file)
    if not path.is_absolute():
        path = settings.base_dir / path
    return [
        FileSink(path, max_bytes=audit.max_file_bytes, keep=audit.keep_files, fsync=audit.fsync)
    ]


@hookimpl
def sidecrypt_check_config(settings: Settings) -> list[str]:
    if settings.audit.file is None:
        return []
    hmac_key(settings)
    return [f"audit: {settings.audit.file} (on_failure: {settings.audit.on_failure})"]


@hookimpl
def sidecrypt_app(app: web.Application, settings: Settings) -> None:
    pm = app[appkeys.PLUGIN_MANAGER]
    sinks = [s for batch in pm.hook.sidecrypt_audit_sinks(settings=settings) for s in batch or ()]
    if not sinks:
        return
    trail = AuditTrail(
        sinks,
        hmac_key(settings),
        block=settings.audit.on_failure == "block",
        queue_size=settings.audit.queue_size,
        checkpoint_interval=settings.audit.checkpoint_interval,
    )
    app[TRAIL] = trail
    app[appkeys.AUDIT_GATE] = trail.accepting
    pm.register(_TrailPlugin(trail), name=f"sidecrypt.audit.trail-{id(app):x}")
    app.cleanup_ctx.append(trail.lifespan)


@hookimpl
def sidecrypt_readiness(app: web.Application) -> list[tuple[str, Any]]:
    trail = app.get(TRAIL)
    if trail is None:
        return []

    async def check() -> None:
        if not trail.accepting():
            state = "queue full" if trail.healthy else "sink failing"
            raise AuditError(f"audit trail cannot record ({state})")

    return [("audit", check)]
