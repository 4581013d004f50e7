"""``python -m bench [--quick]``: start everything on 127.0.0.1, load it, stop it, report."""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import env, micro, report, wrk
from .env import ENC_PATH, PASS_PATH, PORTS, TOK_PATH
from .procs import Service, children_cpu_seconds, cpu_seconds, idle_seconds

HERE = Path(__file__).resolve().parent


def services(w: env.World) -> dict[str, Service]:
    py = sys.executable
    log = lambda name: w.dir / f"{name}.log"  # noqa: E731
    out: dict[str, Service] = {}

    def nginx(name: str, conf: Path) -> None:
        argv = [w.nginx, "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"]
        out[name] = Service(name, argv, port=PORTS[name], log=log(name))

    nginx("upstream", env.nginx_upstream_conf(w))
    upstream = f"http://127.0.0.1:{PORTS['upstream']}"
    for n in (1, 2):
        nginx(f"nginx-tls-{n}", env.nginx_tls_conf(w, n))
        out[f"bare-{n}"] = Service(
            f"bare-{n}",
            [
                py,
                "-m",
                "bench.bare_proxy",
                "--port",
                str(PORTS[f"bare-{n}"]),
                "--upstream",
                upstream,
                "--cert",
                str(w.cert),
                "--key",
                str(w.key),
                "--workers",
                str(n),
            ],
            port=PORTS[f"bare-{n}"],
            log=log(f"bare-{n}"),
        )
        out[f"sidecrypt-{n}"] = Service(
            f"sidecrypt-{n}",
            [py, "-m", "sidecrypt.cli", "run", "--config", str(w.sidecrypt_configs[n])],
            port=PORTS[f"sidecrypt-{n}"],
            log=log(f"sidecrypt-{n}"),
        )
    name = "sidecrypt-aiohttp-1"
    out[name] = Service(
        name,
        [py, "-m", "sidecrypt.cli", "run", "--config", str(w.sidecrypt_configs[0])],
        port=PORTS[name],
        log=log(name),
    )
    return out


def configurations() -> dict[str, report.Config]:
    C = report.Config
    out = {
        "upstream": C(
            "upstream",
            "nginx upstream, direct (HTTP)",
            1,
            "upstream",
            f"http://127.0.0.1:{PORTS['upstream']}{PASS_PATH}",
        )
    }
    for n in (1, 2):
        out[f"nginx-tls-{n}"] = C(
            f"nginx-tls-{n}",
            "nginx TLS proxy",
            n,
            f"nginx-tls-{n}",
            f"https://127.0.0.1:{PORTS[f'nginx-tls-{n}']}{PASS_PATH}",
        )
    for n in (1, 2):
        out[f"bare-{n}"] = C(
            f"bare-{n}",
            "bare aiohttp TLS proxy",
            n,
            f"bare-{n}",
            f"https://127.0.0.1:{PORTS[f'bare-{n}']}{PASS_PATH}",
        )
    for n in (1, 2):
        out[f"sidecrypt-pass-{n}"] = C(
            f"sidecrypt-pass-{n}",
            "sidecrypt pass-through",
            n,
            f"sidecrypt-{n}",
            f"https://127.0.0.1:{PORTS[f'sidecrypt-{n}']}{PASS_PATH}",
        )
    out["sidecrypt-aiohttp-pass-1"] = C(
        "sidecrypt-aiohttp-pass-1",
        "sidecrypt pass-through, aiohttp engine",
        1,
        "sidecrypt-aiohttp-1",
        f"https://127.0.0.1:{PORTS['sidecrypt-aiohttp-1']}{PASS_PATH}",
    )
    for n in (1, 2):
        out[f"sidecrypt-enc-{n}"] = C(
            f"sidecrypt-enc-{n}",
            "sidecrypt field-encrypting",
            n,
            f"sidecrypt-{n}",
            f"https://127.0.0.1:{PORTS[f'sidecrypt-{n}']}{ENC_PATH}",
        )
    out["sidecrypt-tok-1"] = C(
        "sidecrypt-tok-1",
        "sidecrypt tokenizing (3 consistent)",
        1,
        "sidecrypt-1",
        f"https://127.0.0.1:{PORTS['sidecrypt-1']}{TOK_PATH}",
    )
    return out


def check(w: env.World, configs: dict[str, report.Config]) -> None:
    """Every configuration answers correctly before it is timed (decrypted fields included)."""
    ctx = ssl.create_default_context(cafile=str(w.dir / "ca.pem"))
    ctx.check_hostname = False
    plain = json.loads(w.body)
    for c in configs.values():
        req = urllib.request.Request(
            c.url,
            data=w.body,
            method="POST",
            headers={"Content-Type": "application/json", "X-Tenant": env.CONTEXT["tenant"]},
        )
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            got = resp.read()
        fields = c.key.startswith(("sidecrypt-enc", "sidecrypt-tok"))
        want = plain if fields else json.loads(w.enc_body)
        if json.loads(got) != want:
            raise RuntimeError(f"{c.label} (workers={c.workers}) answered wrongly: {got[:200]!r}")


def measure(
    w: env.World,
    svc: dict[str, Service],
    c: report.Config,
    script: Path,
    seconds: float,
    warm: float,
) -> None:
    if warm:
        wrk.run(w.wrk, c.url, script, seconds=warm)
    pids = svc[c.service].pids()
    up = svc["upstream"].pids()
    before, up_before = cpu_seconds(pids), cpu_seconds(up)
    wrk_before, idle_before = children_cpu_seconds(), idle_seconds()
    load = wrk.run(w.wrk, c.url, script, seconds=seconds)
    wrk_after, idle_after = children_cpu_seconds(), idle_seconds()
    after, up_after = cpu_seconds(pids), cpu_seconds(up)
    c.loads.append(load)
    n = max(load.requests, 1)
    c.cpu_us.append((after - before) / n * 1e6)
    c.upstream_cpu_us.append((up_after - up_before) / n * 1e6)
    c.load_cpu_us.append((wrk_after - wrk_before) / n * 1e6)
    c.idle_us.append((idle_after - idle_before) / n * 1e6)
    print(
        f"  {c.label:32} w={c.workers}  {load.rps:9,.0f} req/s  p50 {load.p50_ms:6.2f} ms  "
        f"p99 {load.p99_ms:6.2f} ms  cpu {c.cpu_us[-1]:6.0f} µs/req"
        + (f"  ERRORS {load.errors}" if load.errors else ""),
        flush=True,
    )


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="about 2 minutes: 2 rounds of 4 s")
    p.add_argument("--seconds", type=float, help="seconds per measured run (default 8; quick 4)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 2)")
    p.add_argument("--only", help="comma-separated configuration ids (e.g. sidecrypt-pass-1)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--png", type=Path, default=HERE / "results.png")
    p.add_argument(
        "--hold",
        type=float,
        default=0,
        help="after start-up, keep everything running this many seconds (profiling)",
    )
    p.add_argument("--skip", default="", help="comma-separated parts to skip: paced, micro")
    a = p.parse_args()
    skip = set(a.skip.split(","))
    seconds = a.seconds or (4.0 if a.quick else 8.0)
    rounds = a.rounds or (2 if a.quick else 3)
    warm = 1.0 if a.quick else 2.0

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started: list[Service] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sidecrypt-bench-") as tmp:
        try:
            w = env.prepare(Path(tmp))
            svc = services(w)
            for s in svc.values():
                s.start()
                started.append(s)
            for s in svc.values():
                s.wait_ready()
            configs = configurations()
            check(w, configs)
            print(f"bench: all services up and answering correctly ({w.dir})", flush=True)
            if a.hold:
                print(f"bench: holding for {a.hold:g} s", flush=True)
                time.sleep(a.hold)
            if a.only:
                keep = set(a.only.split(","))
                configs = {k: v for k, v in configs.items() if k in keep}
            headers = {"Content-Type": "application/json", "X-Tenant": env.CONTEXT["tenant"]}
            script = wrk.lua_script(w.dir / "post.lua", w.body, headers, None)
            order = list(configs.values())
            for r in range(rounds if order else 0):  # --only none: services only (--hold)
                print(f"round {r + 1}/{rounds}", flush=True)
                shift = r % len(order)
                for c in order[shift:] + order[:shift]:
                    measure(w, svc, c, script, seconds, warm)
            paced: dict[str, report.Config] = {}
            pace = 0.0
            if {"sidecrypt-enc-1", "sidecrypt-pass-1"} <= configs.keys() and "paced" not in skip:
                # Half of the slowest one-worker sidecrypt rate: loaded, but below saturation.
                pace = 0.5 * configs["sidecrypt-enc-1"].med("rps")
                paced_script = wrk.lua_script(w.dir / "paced.lua", w.body, headers, 50_000 / pace)
                paced = {
                    k: report.Config(k, configs[k].label, 1, configs[k].service, configs[k].url)
                    for k in ("nginx-tls-1", "bare-1", "sidecrypt-pass-1", "sidecrypt-enc-1")
                    if k in configs
                }
                print(f"paced at ~{pace:,.0f} req/s", flush=True)
                paced_order = list(paced.values())
                # p99 of one run moves by ±1 ms with the machine's state: more rounds than the
                # saturated runs, and the target compares runs paired by round (report.targets).
                paced_rounds = rounds if a.quick else max(rounds, 5)
                for r in range(paced_rounds):
                    shift = r % len(paced_order)
                    for c in paced_order[shift:] + paced_order[:shift]:
                        measure(w, svc, c, paced_script, seconds, warm)
            micro_out: dict[str, float] = {}
            if "micro" not in skip:
                print("micro benchmarks", flush=True)
                micro_out = micro.run(w.sidecrypt_configs[1], w.body, quick=a.quick)
            for k, v in micro_out.items():
                print(f"  {k:45} {v:8.1f}")
        except KeyboardInterrupt:
            print("bench: interrupted; stopping everything", file=sys.stderr)
            return 130
        finally:
            for s in reversed(started):
                s.stop()
    if a.only:  # a partial run (profiling, A/B checks): print, keep RESULTS.md as it is
        print("\n".join([*report.load_table(configs), "", *report.shares_table(configs)]))
        return 0
    command = "python -m bench" + (" --quick" if a.quick else "")
    lines = report.write(
        a.out,
        a.png,
        command=command,
        configs=configs,
        paced=paced,
        pace_rps=pace,
        micro=micro_out,
        nginx=w.nginx,
        wrk=w.wrk,
        seconds=seconds,
        rounds=rounds,
    )
    print("\n".join(lines))
    print(f"bench: done in {time.monotonic() - t0:.0f} s; wrote {a.out} and {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
