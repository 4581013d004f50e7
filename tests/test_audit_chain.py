"""The HMAC chain: every kind of tampering is reported at the right record; clean trails pass."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import orjson
import pytest

from sidecrypt.audit_chain import GENESIS, Chain, Record, canonical, key_id, verify_files
from sidecrypt.events import AuditEvent

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def make_records(
    n: int = 5, key: bytes = KEY, *, seal: bool = True, start: float = 1000.0
) -> list[Record]:
    chain = Chain(key)
    out = [chain.seal("chain_start", {"reason": "start", "key_id": chain.key_id}, now=start)]
    for i in range(n):
        event = AuditEvent("encrypt_fields", key="app", fields=("$.ssn",), count=1, time=1.0 + i)
        out.append(chain.seal("event", {"event": event.to_dict()}, now=1000.0 + i))
    if seal:
        out.append(chain.seal("seal", {"reason": "shutdown"}, now=2000.0))
    return out


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def lines_of(records: list[Record]) -> list[bytes]:
    return [r.line for r in records]


def test_clean_trail_passes(tmp_path: Path) -> None:
    records = make_records()
    result = verify_files([write(tmp_path / "a.jsonl", lines_of(records))], KEY)
    assert result.ok, result.summary()
    assert result.records == len(records)
    assert result.complete_start
    assert result.last_seq == records[-1].seq and result.last_mac == records[-1].mac
    assert result.summary().startswith("OK")


def test_line_is_the_record_and_mac_covers_canonical_json() -> None:
    record = make_records(1)[1]
    data = orjson.loads(record.line)
    assert data == record.data
    body = {k: v for k, v in data.items() if k != "mac"}
    expected = hmac.new(KEY, canonical(body), hashlib.sha256).hexdigest()
    assert data["mac"] == expected
    assert data["prev"] != GENESIS and data["seq"] == 2


def test_edited_field_is_detected(tmp_path: Path) -> None:
    lines = lines_of(make_records())
    data = orjson.loads(lines[3])
    data["event"]["key"] = "billing"  # edit, keep the old mac
    lines[3] = orjson.dumps(data) + b"\n"
    result = verify_files([write(tmp_path / "a.jsonl", lines)], KEY)
    assert not result.ok
    assert result.problem is not None
    assert (result.problem.kind, result.problem.line, result.problem.seq) == (
        "forged_or_altered",
        4,
        4,
    )


def test_deleted_record_is_detected(tmp_path: Path) -> None:
    lines = lines_of(make_records())
    del lines[2]
    result = verify_files([write(tmp_path / "a.jsonl", lines)], KEY)
    assert result.problem is not None
    assert result.problem.kind == "removed"
    assert "seq 3" in result.problem.message and result.problem.line == 3


def test_swapped_records_are_detected(tmp_path: Path) -> None:
    lines = lines_of(make_records())
    lines[2], lines[3] = lines[3], lines[2]
    result = verify_files([write(tmp_path / "a.jsonl", lines)], KEY)
    assert result.problem is not None
    assert result.problem.kind == "reordered" and result.problem.line == 3


def test_truncated_tail_is_detected(tmp_path: Path) -> None:
    lines = lines_of(make_records())[:-2]  # seal and last event gone
    result = verify_files([write(tmp_path / "a.jsonl", lines)], KEY)
    assert result.problem is not None and result.problem.kind == "truncated"


def test_cut_mid_line_is_detected(tmp_path: Path) -> None:
    lines = lines_of(make_records())
    lines[-1] = lines[-1][:20]
    result = verify_files([write(tmp_path / "a.jsonl", lines)], KEY)
    assert result.problem is not None and result.problem.kind == "malformed"


def test_forged_record_without_the_key_is_detected(tmp_path: Path) -> None:
    records = make_records()
    # The forger knows the format and the previous mac, but not the key.
    prev = records[2]
    forged = {
        "seq": prev.seq + 1,
        "time": "2026-01-01T00:00:00.000000Z",
        "kind": "event",
        "event": {"action": "encrypt_fields", "key": "app"},
        "prev": prev.mac,
    }
    forged["mac"] = hmac.new(OTHER_KEY, canonical(forged), hashlib.sha256).hexdigest()
    lines = lines_of(records)
    lines.insert(3, orjson.dumps(forged) + b"\n")
    result = verify_files([write(tmp_path / "a.jsonl", lines)], KEY)
    assert result.problem is not None
    assert result.problem.kind == "forged_or_altered" and result.problem.line == 4


def test_rechained_tail_with_another_key_is_detected(tmp_path: Path) -> None:
    records = make_records()
    fake = Chain(OTHER_KEY, seq=records[2].seq, prev=records[2].mac)
    tail = [fake.seal("event", {"event": {"action": "x"}}, now=1.0) for _ in range(3)]
    tail.append(fake.seal("seal", {"reason": "shutdown"}, now=2.0))
    lines = lines_of(records[:3] + tail)
    result = verify_files([write(tmp_path / "a.jsonl", lines)], KEY)
    assert result.problem is not None
    assert result.problem.kind == "forged_or_altered" and result.problem.line == 4


def test_replayed_record_is_detected(tmp_path: Path) -> None:
    lines = lines_of(make_records())
    lines.insert(4, lines[2])
    result = verify_files([write(tmp_path / "a.jsonl", lines)], KEY)
    assert result.problem is not None
    assert result.problem.kind == "inserted" and result.problem.line == 5


def test_record_from_another_trail_is_detected(tmp_path: Path) -> None:
    ours, theirs = make_records(), make_records(start=5000.0)  # same key and seqs
    lines = lines_of(ours)
    lines[3] = theirs[3].line
    result = verify_files([write(tmp_path / "a.jsonl", lines)], KEY)
    assert result.problem is not None and result.problem.kind == "inserted"


def test_removed_beginning_is_detected(tmp_path: Path) -> None:
    lines = lines_of(make_records())[2:]
    result = verify_files([write(tmp_path / "a.jsonl", lines)], KEY)
    assert result.problem is not None and result.problem.kind == "removed"


def test_wrong_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", lines_of(make_records()))
    result = verify_files([path], OTHER_KEY)
    assert result.problem is not None and result.problem.kind == "wrong_key"
    assert key_id(KEY) in result.problem.message


def test_empty_trail_fails(tmp_path: Path) -> None:
    result = verify_files([write(tmp_path / "a.jsonl", [])], KEY)
    assert result.problem is not None and result.problem.kind == "empty"


def test_split_files_verify_in_any_order(tmp_path: Path) -> None:
    records = make_records(8)
    older = write(tmp_path / "a.jsonl.1", lines_of(records[:5]))
    newer = write(tmp_path / "a.jsonl", lines_of(records[5:]))
    result = verify_files([newer, older], KEY)
    assert result.ok, result.summary()
    assert result.files == [str(older), str(newer)]
    alone = verify_files([older], KEY)
    assert alone.problem is not None and alone.problem.kind == "truncated"


def test_chain_never_shows_its_key() -> None:
    chain = Chain(KEY)
    assert "kkkk" not in repr(chain)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Chain(b"short")


def test_unreadable_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    result = verify_files([tmp_path / "missing.jsonl"], KEY)
    assert result.problem is not None and result.problem.kind == "not_found"
    assert str(result) == f"FAILED: not_found: not found: {tmp_path / 'missing.jsonl'}"
    result = verify_files([tmp_path], KEY)  # a directory: unreadable, no line number
    assert result.problem is not None and result.problem.kind == "unreadable"
    assert str(result).startswith(f"FAILED: {tmp_path}: unreadable") and "None" not in str(result)


def test_trails_are_grouped_by_name_rotated_files_together(tmp_path: Path) -> None:
    from sidecrypt.audit_chain import trail_name

    assert trail_name("a.jsonl") == trail_name("a.jsonl.1") == trail_name("a.jsonl.12")
    assert trail_name("a.jsonl.w0") != trail_name("a.jsonl.w1")
    assert trail_name("a.jsonl.w0.3") == "a.jsonl.w0"


def test_cli_verify_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecrypt import cli

    monkeypatch.setenv("AUDIT_KEY", KEY.decode())
    path = write(tmp_path / "a.jsonl", lines_of(make_records()))
    assert cli.main(["audit", "verify", str(path), "--key-env", "AUDIT_KEY"]) == 0
    assert capsys.readouterr().out.startswith("OK: 7 records")
    path.write_bytes(b"".join(lines_of(make_records())[:-1]))
    assert cli.main(["audit", "verify", str(path), "--key-env", "AUDIT_KEY"]) != 0
    assert "truncated" in capsys.readouterr().out
