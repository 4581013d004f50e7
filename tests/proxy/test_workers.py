"""``server.workers: N``: the supervisor, ``/metrics`` for every worker, and what a review of
them found (signals during start-up and restarts, orphaned workers, peers' bad or huge
expositions, label clashes, and a route hidden behind a parameter-only segment).

Real processes (``python -m sidecrypt.cli run``), real Unix sockets and real TCP throughout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tests.test_cli import example  # noqa: F401  (the example config, listen.tls on)

from sidecrypt.plugins import metrics_workers

SIDECRYPT = [sys.executable, "-m", "sidecrypt.cli"]
SECRET = "SECRET-wr-77c1"


# -- the supervisor ------------------------------------------------------------------------------


def _plain_config(tmp_path: Path) -> Path:
    """A plain-HTTP run (no listen.tls): what client-side mode on loopback uses."""
    path = tmp_path / "plain.yaml"
    path.write_text(
        'listen: {address: "127.0.0.1:0"}\n'
        'admin: {address: "127.0.0.1:0"}\n'
        'upstream: {url: "http://127.0.0.1:9"}\n'
        "routes: []\n"
    )
    return path


def _start(config: Path, tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    (tmp_path / "run").mkdir(exist_ok=True)
    return subprocess.Popen(
        [*SIDECRYPT, "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        env={
            **os.environ,
            "SIDECRYPT_WORKERS": "2",
            "SIDECRYPT_LISTEN_ADDRESS": f"127.0.0.1:{_free_port()}",
            "TMPDIR": str(tmp_path / "run"),
            **env,
        },
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(proc: subprocess.Popen[bytes], count: int, limit: float = 20) -> list[int]:
    """Pids of the next ``count`` workers that log they listen; fewer if the run ends first."""
    assert proc.stderr is not None
    pids: list[int] = []
    deadline = time.monotonic() + limit
    while len(pids) < count and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:  # the run ended
            break
        if b"sidecrypt listening" in line:
            pids.append(json.loads(line)["pid"])
    return pids


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _catches(pid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _reap(proc: subprocess.Popen[bytes], pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(timeout=10)


def test_sighup_to_a_plain_http_multi_worker_run_keeps_it_serving(tmp_path: Path) -> None:
    proc = _start(_plain_config(tmp_path), tmp_path)
    pids: list[int] = []
    try:
        pids = _listening(proc, 2)
        assert len(pids) == 2
        proc.send_signal(signal.SIGHUP)  # a reload request (systemd ExecReload, a hang-up)
        time.sleep(1.0)
        assert proc.poll() is None, "the run ended on SIGHUP"
        assert all(_alive(pid) for pid in pids), "workers were killed by SIGHUP"
    finally:
        _reap(proc, pids)


def test_sighup_while_workers_start_does_not_end_the_run(
    example: Path,  # noqa: F811  (test_cli's fixture, imported above)
    tmp_path: Path,
) -> None:
    proc = _start(example, tmp_path, SIDECRYPT_UPSTREAM_URL="http://127.0.0.1:9")
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 20
        # The master catches SIGHUP and has spawned its workers (and the resource tracker).
        while time.monotonic() < deadline and not (
            _catches(proc.pid, signal.SIGHUP) and len(_children(proc.pid)) >= 3
        ):
            time.sleep(0.01)
        proc.send_signal(signal.SIGHUP)
        pids = _listening(proc, 2, limit=15)
        assert proc.poll() is None and len(pids) == 2, "the run ended on SIGHUP at start-up"
    finally:
        _reap(proc, pids + _children(proc.pid))


SUPERVISE_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys, threading, time
    from pathlib import Path
    from sidecrypt.proxy import workers
    from sidecrypt.proxy.workers import Worker

    FLAG = sys.argv[1] + "/crashed"
    launched = []

    def fake_worker(settings, worker):
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        if worker.index == 1 and not os.path.exists(FLAG):
            open(FLAG, "w").close()
            time.sleep(0.3)
            os._exit(3)  # a crash: the master starts a replacement
        while True:
            time.sleep(0.05)

    fork = multiprocessing.get_context("fork")

    class Ctx:
        def Process(self, **kw):
            proc = fork.Process(**kw)
            launched.append(proc)
            if len(launched) == 3:  # the replacement for worker 1
                start = proc.start

                def start_with_sigterm():
                    # The operator's SIGTERM lands while the replacement is being spawned.
                    os.kill(os.getpid(), signal.SIGTERM)
                    start()

                proc.start = start_with_sigterm
            return proc

    def watchdog():
        time.sleep(5)
        print("HUNG", flush=True)
        for p in launched:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except (OSError, TypeError):
                pass
        os._exit(99)

    workers._worker = fake_worker
    workers.STARTUP_GRACE = 0.0
    workers.multiprocessing.get_context = lambda method: Ctx()
    threading.Thread(target=watchdog, daemon=True).start()
    code = workers._supervise(None, [Worker(i, 2, Path(sys.argv[1])) for i in range(2)])
    print("exit", code, flush=True)
    os._exit(0)
    """
)


def test_sigterm_during_a_replacement_start_stops_the_run(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SUPERVISE_SCRIPT, str(tmp_path)],
        capture_output=True,
        timeout=30,
    )
    assert out.stdout.strip() == b"exit 0", out.stdout + out.stderr[-2000:]


def test_workers_do_not_outlive_a_killed_master(tmp_path: Path) -> None:
    proc = _start(_plain_config(tmp_path), tmp_path)
    pids: list[int] = []
    try:
        pids = _listening(proc, 2)
        assert len(pids) == 2
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids), "orphaned workers still serve"
    finally:
        _reap(proc, pids)


def test_sigterm_stops_every_worker_and_removes_the_socket_directory(tmp_path: Path) -> None:
    proc = _start(_plain_config(tmp_path), tmp_path)
    pids: list[int] = []
    try:
        pids = _listening(proc, 2)
        assert len(pids) == 2
        (rundir,) = (tmp_path / "run").iterdir()
        assert rundir.stat().st_mode & 0o777 == 0o700  # mkdtemp: nobody else enters it
        assert [p.name for p in rundir.iterdir()] == ["w1.sock"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not any(_alive(p) for p in pids)
        assert not any((tmp_path / "run").iterdir())
    finally:
        _reap(proc, pids)


# -- /metrics fan-in ---------------------------------------------------------------------------


def test_merge_of_escaped_labels_and_created_samples_is_valid_text() -> None:
    """Label values with quotes, backslashes, newlines and a literal backslash-n round-trip;
    counters' _created gauges and HELP/TYPE appear once per family."""
    values = ['a"b', "c\\d", "e\nf", "k\\nl", "g}h,i=j", "é"]
    registry = CollectorRegistry()
    counter = Counter("sidecrypt_x", "Help \\ with\nlines", ["route"], registry=registry)
    for v in values:
        counter.labels(v).inc()
    text = generate_latest(registry)
    merged = metrics_workers.merge([(0, text), (1, text)]).decode()
    for line in ("# TYPE sidecrypt_x_total counter", "# TYPE sidecrypt_x_created gauge"):
        assert merged.count(line) == 1
    got = {
        (s.name, s.labels["route"], s.labels["worker"])
        for f in text_string_to_metric_families(merged)
        for s in f.samples
        if "route" in s.labels
    }
    assert got == {
        (name, v, w)
        for name in ("sidecrypt_x_total", "sidecrypt_x_created")
        for v in values
        for w in ("0", "1")
    }
