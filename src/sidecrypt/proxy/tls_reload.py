"""TLS reload by replacement: a fresh context on SIGHUP or when its files change on disk.

Loading certificates into a live ``SSLContext`` only ever adds (``load_verify_locations``
appends CAs), so a CA removed from ``client_ca`` would stay trusted. A reload therefore builds a
whole new context through the same builders as start-up (proxy/tls.py) and swaps it in:

- the listener: asyncio servers keep the context they were created with, so that first context
  gets an ``sni_callback`` that moves each new handshake onto the current one
  (``ssl_object.context = current``; OpenSSL then uses its certificate, key and CA store).
  Established connections keep the context they started with and finish normally; a resumed
  session that began before the reload is refused when clients are verified (see ``select``).
- the upstream pool: new connections use the current context; idle ones, verified under the
  old trust, are closed (proxy/upstream.py).

A reload that fails (missing file, broken PEM, key not matching) keeps the previous context, logs
why (never file content) and counts a failure (``sidecrypt_tls_reload_total``). Files are polled
every ``server.tls_reload_interval`` seconds (as ghostunnel's timed reload; Kubernetes rotates
mounted Secrets without a signal): a change of inode, size, mtime or content triggers a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[object, ...], ...]


def fingerprint(files: Sequence[Path]) -> Fingerprint:
    """What identifies the files' current state: identity, size, mtime and a content digest."""
    out: list[tuple[object, ...]] = []
    for path in files:
        try:
            with path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                digest = hashlib.sha256(fh.read()).digest()
        except OSError as exc:
            out.append((str(path), "unreadable", exc.errno))
            continue
        out.append((str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest))
    return tuple(out)


def _reason(exc: BaseException) -> str:
    """Why a build failed, in words safe to log: ConfigError messages name paths, not content."""
    from ..errors import SidecryptError

    if isinstance(exc, SidecryptError):
        return str(exc)
    if isinstance(exc, ssl.SSLError):
        return f"{type(exc).__name__} ({exc.reason or 'unknown'})"
    return type(exc).__name__


class LiveContext:
    """One TLS context that is replaced whole, never edited in place."""

    def __init__(
        self,
        name: str,
        build: Callable[[], ssl.SSLContext],
        files: Sequence[Path],
        *,
        on_swap: Callable[[ssl.SSLContext], None] | None = None,
    ) -> None:
        self.name = name
        self._build = build
        self.files = tuple(files)
        self._seen = fingerprint(self.files)
        self.current = build()  # start-up errors propagate: no old context to keep
        self.on_swap = on_swap
        self.swapped_at = 0  # whole seconds, as SSLSession.time: sessions up to it are stale
        self.stale_refused = 0  # resumed handshakes refused (sessions from before a reload)
        self.successes = 0
        self.failures = 0
        self.last_success = time.time()

    def select(
        self, ssl_object: ssl.SSLObject, _name: str | None, ctx: ssl.SSLContext
    ) -> int | None:
        """``sni_callback`` of the listener's first context: the handshake uses the current one.

        OpenSSL has decided on resumption by now, and a resumed session skips certificate
        checks: one begun before the last reload, when clients are verified, could carry a
        client certificate from a CA no longer trusted. Its handshake is refused; the client's
        next one is a full handshake under the current context.
        """
        current = self.current
        if current is ctx:
            return None
        if ssl_object.session_reused and current.verify_mode == ssl.CERT_REQUIRED:
            session = ssl_object.session
            if session is None or session.time <= self.swapped_at:
                self.stale_refused += 1
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        ssl_object.context = current
        return None

    def reload(self, *, seen: Fingerprint | None = None) -> bool:
        """Build a fresh context and swap it in; on failure keep the old one. True if swapped."""
        self._seen = fingerprint(self.files) if seen is None else seen
        try:
            fresh = self._build()
        except Exception as exc:
            self.failures += 1
            log.error(
                "tls reload failed; keeping the previous context",
                extra={"context": self.name, "error": _reason(exc)},
            )
            return False
        self.swapped_at = int(time.time())  # a session from this very second counts as stale
        self.current = fresh
        if self.on_swap is not None:
            self.on_swap(fresh)
        self.successes += 1
        self.last_success = time.time()
        log.info("tls context reloaded", extra={"context": self.name})
        return True

    def changed(self, now: Fingerprint) -> bool:
        return now != self._seen


class Reloads:
    """Every live context of one proxy: reloaded together on SIGHUP, polled for file changes."""

    def __init__(self) -> None:
        self.contexts: list[LiveContext] = []

    def add(self, live: LiveContext | None) -> None:
        if live is not None:
            self.contexts.append(live)

    def reload_all(self) -> None:
        for live in self.contexts:
            live.reload()

    async def poll_once(self) -> None:
        for live in self.contexts:
            now = await asyncio.to_thread(fingerprint, live.files)
            if live.changed(now):
                live.reload(seen=now)  # a failed build is retried when the files change again

    async def watch(self, interval: float) -> None:
        """Poll forever (cancel to stop); one failing check never ends the watch."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll_once()
            except Exception:
                log.exception("tls file check failed")

    def start(self, interval: float) -> asyncio.Task[None] | None:
        if interval <= 0 or not any(live.files for live in self.contexts):
            return None
        return asyncio.get_running_loop().create_task(self.watch(interval))


async def stop(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def listener(build: Callable[[], ssl.SSLContext], files: Sequence[Path]) -> LiveContext:
    """The listener's live context; hand ``live.current`` (the first) to the server."""
    live = LiveContext("listen", build, files)
    live.current.sni_callback = live.select
    return live
