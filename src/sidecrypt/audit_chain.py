"""The tamper-evident audit chain: sealing records and verifying trails. Knows no HTTP.

Each record is one JSON line::

    {"seq": 7, "time": "2026-01-02T03:04:05.123456Z", "kind": "event", "event": {...},
     "prev": "<mac of record 6>", "mac": "<hex HMAC-SHA256>"}

``mac`` is HMAC-SHA256 (stdlib ``hmac``) over the canonical JSON of the record without ``mac``
(orjson, keys sorted, no spaces). Because ``prev`` is inside the MAC, editing, removing, swapping
or inserting a record breaks the chain at that point, and nobody without the key can forge one.

Record kinds: ``chain_start`` (first record of a run and of every rotated file; carries the
key id and links to the previous file's last MAC), ``event`` (one :class:`AuditEvent`),
``drop`` (how many events were dropped before they could be sealed, ``on_failure: drop``),
``checkpoint`` (written when the writer is idle, at most every ``checkpoint_interval``) and
``seal`` (clean shutdown or rotation).

Limit, stated honestly: a trail whose tail was cut *exactly* after a checkpoint or seal cannot be
told from a complete one by the trail alone. :func:`verify_files` reports the last seq and MAC so
an operator can anchor them elsewhere (the proxy also logs them at shutdown); a tail cut anywhere
else is reported as truncated.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import orjson

GENESIS = "0" * 64
MIN_KEY_BYTES = 16
END_KINDS = frozenset({"seal", "checkpoint"})


def canonical(data: Mapping[str, Any]) -> bytes:
    """The exact bytes the MAC covers."""
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


def key_id(key: bytes) -> str:
    """A short public name for an audit key (an HMAC of a constant: reveals nothing)."""
    return hmac.new(key, b"sidecrypt audit key id", hashlib.sha256).hexdigest()[:16]


def _mac(key: bytes, data: Mapping[str, Any]) -> str:
    return hmac.new(key, canonical(data), hashlib.sha256).hexdigest()


_iso_second: tuple[int, str] = (-1, "")


def _iso(ts: float) -> str:
    """UTC ISO-8601 with microseconds; the per-second prefix is reused (the writer's hot loop)."""
    global _iso_second
    sec = int(ts)
    cached = _iso_second  # one read: safe even if another thread swaps it
    if cached[0] != sec:
        cached = _iso_second = (sec, datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{int((ts - sec) * 1e6):06d}Z"


@dataclass(frozen=True, slots=True)
class Record:
    """One sealed record: ``data`` includes ``mac``; ``line`` is what a file sink writes."""

    seq: int
    kind: str
    mac: str
    data: dict[str, Any]
    line: bytes


@runtime_checkable
class AuditSink(Protocol):
    """Where sealed records go. Returned by the ``sidecrypt_audit_sinks`` hook.

    ``write`` gets records in chain order; raising means "not written" and the writer retries
    the same records (nothing is lost or reordered). Optional duck-typed extras, used when
    present: ``async open() -> dict | None`` (start; return the last record already stored so the
    chain resumes from it), ``wants_rotation() -> bool`` and ``async rotate()``.
    """

    name: str

    async def write(self, records: Sequence[Record]) -> None: ...

    async def close(self) -> None: ...


class Chain:
    """Assigns seq and prev, computes the MAC. One per trail; the key never shows in a repr."""

    __slots__ = ("_key", "key_id", "prev", "seq")

    def __init__(self, key: bytes, *, seq: int = 0, prev: str = GENESIS) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the audit HMAC key must have at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self.key_id = key_id(key)
        self.seq = seq
        self.prev = prev

    def __repr__(self) -> str:
        return f"Chain(key_id={self.key_id!r}, seq={self.seq})"

    def seal(self, kind: str, body: Mapping[str, Any], *, now: float) -> Record:
        data: dict[str, Any] = dict(body)
        data.update(seq=self.seq + 1, time=_iso(now), kind=kind, prev=self.prev)
        raw = canonical(data)
        mac = hmac.digest(self._key, raw, "sha256").hex()  # one-shot C path: the hot loop
        data["mac"] = mac
        self.seq += 1
        self.prev = mac
        return Record(self.seq, kind, mac, data, raw[:-1] + b',"mac":"' + mac.encode() + b'"}\n')

    def authentic(self, data: Mapping[str, Any]) -> bool:
        """Does a stored record (with its ``mac``) carry a valid MAC under this key?"""
        mac = data.get("mac")
        if not isinstance(mac, str):
            return False
        body = {k: v for k, v in data.items() if k != "mac"}
        return hmac.compare_digest(_mac(self._key, body), mac)


# -- verification --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a trail. ``kind``: malformed, forged_or_altered, wrong_key,
    removed, reordered, inserted, truncated, empty."""

    kind: str
    message: str
    file: str | None = None
    line: int | None = None
    seq: int | None = None

    def __str__(self) -> str:
        where = (
            "" if not self.file else f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        )
        return f"{where}{self.kind}: {self.message}"


@dataclass(slots=True)
class VerifyResult:
    files: list[str]
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_mac: str | None = None
    complete_start: bool = False
    problem: Problem | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def __str__(self) -> str:
        return "\n".join([self.summary(), *(f"warning: {w}" for w in self.warnings)])

    def summary(self) -> str:
        if self.problem is not None:
            return f"FAILED: {self.problem}"
        start = (
            "from the first record"
            if self.complete_start
            else (f"from seq {self.first_seq} (earlier files not given or removed by retention)")
        )
        return (
            f"OK: {self.records} records in {len(self.files)} file(s), {start} to seq "
            f"{self.last_seq}; last mac {self.last_mac}"
        )


@dataclass(slots=True)
class _Entry:
    file: str
    line: int
    data: dict[str, Any] | None
    seq: int | None


def _load(path: Path) -> list[_Entry]:
    out = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                data = None
            if not isinstance(data, dict) or not isinstance(data.get("seq"), int):
                out.append(_Entry(str(path), lineno, None, None))
            else:
                out.append(_Entry(str(path), lineno, data, data["seq"]))
    return out


def _first_seq(entries: list[_Entry]) -> float:
    return next((e.seq for e in entries if e.seq is not None), float("inf"))


def verify_files(paths: Iterable[str | Path], key: bytes) -> VerifyResult:
    """Check a trail (one file or a rotated set, in any order) and report the first problem."""
    loaded = []
    for p in paths:
        try:
            loaded.append(_load(Path(p)))
        except FileNotFoundError:
            return VerifyResult(files=[str(p)], problem=Problem("not_found", f"not found: {p}"))
        except OSError as exc:
            return VerifyResult(
                files=[str(p)], problem=Problem("unreadable", exc.strerror or "cannot read", str(p))
            )
    loaded.sort(key=_first_seq)
    entries = [e for file_entries in loaded for e in file_entries]
    result = VerifyResult(files=[fe[0].file for fe in loaded if fe])
    chain = Chain(key)

    def fail(kind: str, message: str, entry: _Entry | None = None) -> VerifyResult:
        if entry is None:
            result.problem = Problem(kind, message)
        else:
            result.problem = Problem(kind, message, entry.file, entry.line, entry.seq)
        return result

    if not entries:
        return fail("empty", "no records")
    later: dict[int, int] = {}  # seq -> last position where it occurs
    for pos, e in enumerate(entries):
        if e.seq is not None:
            later[e.seq] = pos
    seen: set[int] = set()
    expected_seq = expected_prev = None
    for pos, entry in enumerate(entries):
        data = entry.data
        if data is None or entry.seq is None:
            return fail("malformed", "not a JSON audit record (cut or overwritten)", entry)
        seq = entry.seq
        if not chain.authentic(data):
            if pos == 0 and data.get("key_id") not in (None, chain.key_id):
                return fail(
                    "wrong_key",
                    f"the trail was written with audit key id {data.get('key_id')}, "
                    f"the given key has id {chain.key_id}",
                    entry,
                )
            return fail(
                "forged_or_altered",
                f"record seq {seq} fails authentication: edited, or forged without the key",
                entry,
            )
        if pos == 0:
            if data.get("kind") != "chain_start":
                return fail(
                    "removed",
                    "the trail does not begin with a chain_start record: records "
                    "were removed from the beginning",
                    entry,
                )
            result.first_seq = seq
            result.complete_start = seq == 1 and data.get("prev") == GENESIS
        elif seq != expected_seq:
            assert expected_seq is not None
            if seq > expected_seq:
                if later.get(expected_seq, -1) > pos:
                    return fail(
                        "reordered", f"record seq {seq} appears before seq {expected_seq}", entry
                    )
                missing = (
                    f"{expected_seq}" if seq == expected_seq + 1 else (f"{expected_seq}..{seq - 1}")
                )
                return fail(
                    "removed", f"record(s) seq {missing} are missing before seq {seq}", entry
                )
            if seq in seen:
                return fail("inserted", f"record seq {seq} appears a second time (replayed)", entry)
            return fail(
                "reordered", f"record seq {seq} appears after seq {expected_seq - 1}", entry
            )
        elif data.get("prev") != expected_prev:
            return fail(
                "inserted",
                f"record seq {seq} does not link to the record before it (taken from another "
                "trail, or the records in between were replaced)",
                entry,
            )
        if (
            data.get("kind") == "chain_start"
            and data.get("reason") == "resume"
            and not data.get("previous_sealed", True)
        ):
            result.warnings.append(
                f"the run ending at seq {seq - 1} stopped without a seal (crash, kill, or a tail "
                "cut before restart)"
            )
        seen.add(seq)
        expected_seq, expected_prev = seq + 1, data["mac"]
        result.records += 1
        result.last_seq, result.last_mac = seq, data["mac"]
    last = entries[-1]
    if last.data is not None and last.data.get("kind") not in END_KINDS:
        return fail(
            "truncated",
            f"the trail ends at seq {last.seq} without a checkpoint or seal: the tail was cut, "
            "the writer is still running, or it stopped uncleanly",
            last,
        )
    return result


_ROTATED = re.compile(r"\.\d+$")


def trail_name(path: str | Path) -> str:
    """The trail a file belongs to: FILE, FILE.1, FILE.2 (rotation) are FILE; FILE.w0 is its own."""
    return _ROTATED.sub("", str(path))


def verify_trails(paths: Iterable[str | Path], key: bytes) -> list[tuple[str, VerifyResult]]:
    """Verify each trail on its own chain: files are grouped by ``trail_name``.

    One worker writes one trail (``FILE.w0``, ``FILE.w1``, ...), each with its own sequence
    numbers, so verifying them as one chain would report the second as replayed records.
    """
    trails: dict[str, list[str | Path]] = {}
    for p in paths:
        trails.setdefault(trail_name(p), []).append(p)
    return [(name, verify_files(files, key)) for name, files in trails.items()]


def last_record(path: Path, *, window: int = 1 << 16) -> dict[str, Any] | None:
    """The last record of a file (for resuming its chain), or None when the file is empty.

    Raises ValueError when the last line is not a record.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with path.open("rb") as fh:
        fh.seek(max(0, size - window))
        tail = fh.read()
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    if not lines:
        return None
    try:
        data = orjson.loads(lines[-1])
    except orjson.JSONDecodeError:
        raise ValueError("its last line is not a complete audit record") from None
    if not isinstance(data, dict) or not isinstance(data.get("seq"), int):
        raise ValueError("its last line is not an audit record")
    return data
