"""Medians, targets, the RESULTS.md table and the plot."""

from __future__ import annotations

import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .wrk import Load


@dataclass
class Config:
    key: str  # stable id: "sidecrypt-enc-1"
    label: str
    workers: int
    service: str
    url: str
    loads: list[Load] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # proxy CPU per request
    upstream_cpu_us: list[float] = field(default_factory=list)
    load_cpu_us: list[float] = field(default_factory=list)  # wrk's CPU per request
    idle_us: list[float] = field(default_factory=list)  # the machine's idle time per request

    def med(self, what: str) -> float:
        if what in PER_REQUEST:
            vals: list[float] = getattr(self, what)
        else:
            vals = [getattr(x, what) for x in self.loads]
        return statistics.median(vals) if vals else float("nan")

    @property
    def errors(self) -> int:
        return sum(x.errors for x in self.loads)


PER_REQUEST = frozenset({"cpu_us", "upstream_cpu_us", "load_cpu_us", "idle_us"})


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def load_table(configs: dict[str, Config]) -> list[str]:
    rows = [
        "| configuration | workers | requests/s | p50 ms | p99 ms | proxy CPU µs/req "
        "| vs nginx TLS | vs sidecrypt pass-through | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs.values():
        ref = configs.get(f"nginx-tls-{c.workers}")
        own = configs.get(f"sidecrypt-pass-{c.workers}")
        own = own if c.key.startswith("sidecrypt-enc") else None
        cpu = "-" if c.key == "upstream" else f"{c.med('cpu_us'):.0f}"
        rows.append(
            f"| {c.label} | {c.workers} | {c.med('rps'):,.0f} | {c.med('p50_ms'):.2f} "
            f"| {c.med('p99_ms'):.2f} | {cpu} "
            f"| {_ratio(c.med('rps'), ref.med('rps')) if ref else '-'} "
            f"| {_ratio(c.med('rps'), own.med('rps')) if own else '-'} "
            f"| {c.errors} |"
        )
    return rows


def targets(
    configs: dict[str, Config], paced: dict[str, Config], micro: dict[str, float]
) -> list[tuple[str, str, bool]]:
    out = []
    r = lambda k: configs[k].med("rps")  # noqa: E731
    for w in (1, 2):
        ratio = r(f"sidecrypt-enc-{w}") / r(f"sidecrypt-pass-{w}")
        out.append(
            (f"field-encrypting ≥ 90% of pass-through (workers={w})", f"{ratio:.0%}", ratio >= 0.9)
        )
    for w in (1, 2):
        ratio = r(f"sidecrypt-pass-{w}") / r(f"bare-{w}")
        out.append(
            (f"pass-through ≥ bare aiohttp proxy (workers={w})", f"{ratio:.2f}x", ratio >= 1.0)
        )
    for w in (1, 2):
        ratio = r(f"sidecrypt-pass-{w}") / r(f"nginx-tls-{w}")
        out.append(
            (f"pass-through ≥ 25% of nginx TLS (workers={w})", f"{ratio:.0%}", ratio >= 0.25)
        )
    if "sidecrypt-enc-1" in paced and "sidecrypt-pass-1" in paced:
        # Paired by round: the two runs of one round are seconds apart and share the machine's
        # state, so their difference is steadier than the difference of two medians.
        enc, plain = paced["sidecrypt-enc-1"].loads, paced["sidecrypt-pass-1"].loads
        diffs = sorted(e.p99_ms - p.p99_ms for e, p in zip(enc, plain, strict=False))
        added = statistics.median(diffs)
        out.append(
            (
                "p99 added by encrypting ≤ 1 ms below saturation (workers=1)",
                f"{added:+.2f} ms (median of {len(diffs)} paired rounds, "
                f"{diffs[0]:+.2f} to {diffs[-1]:+.2f})",
                added <= 1.0,
            )
        )
    enc = micro.get("encrypt one field (µs)")
    if enc is not None:
        out.append(("per-field encrypt ≤ 10 µs", f"{enc:.1f} µs", enc <= 10))
    for kind in ("pass", "enc"):
        ratio = r(f"sidecrypt-{kind}-2") / r(f"sidecrypt-{kind}-1")
        name = "pass-through" if kind == "pass" else "field-encrypting"
        bound = scaling_bound(configs[f"sidecrypt-{kind}-1"], configs[f"sidecrypt-{kind}-2"])
        measured = f"{ratio:.2f}x (the machine allows {bound:.2f}x: see the CPU shares)"
        out.append((f"workers=2 ≥ 1.7x workers=1 ({name})", measured, ratio >= 1.7))
    return out


def scaling_bound(one: Config, two: Config) -> float:
    """What two workers can give over one that fills a core, on 2 cores shared with the
    upstream and wrk: 2 cores / (proxy + upstream + wrk) per request with two, against
    1 core / proxy with one."""
    spent = two.med("cpu_us") + two.med("upstream_cpu_us") + two.med("load_cpu_us")
    return 2 * one.med("cpu_us") / spent


def shares_table(configs: dict[str, Config]) -> list[str]:
    rows = [
        "| configuration | workers | proxy | upstream nginx | wrk | idle |",
        "|---|---|---|---|---|---|",
    ]
    for c in configs.values():
        if c.key.startswith("sidecrypt-") and "aiohttp" not in c.key:
            rows.append(
                f"| {c.label} | {c.workers} | {c.med('cpu_us'):.0f} "
                f"| {c.med('upstream_cpu_us'):.0f} | {c.med('load_cpu_us'):.0f} "
                f"| {c.med('idle_us'):.0f} |"
            )
    return rows


def plot(configs: dict[str, Config], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{c.label}\nworkers={c.workers}" for c in configs.values()]
    rps = [c.med("rps") for c in configs.values()]
    p99 = [c.med("p99_ms") for c in configs.values()]
    colors = [
        "#888888"
        if c.key == "upstream"
        else "#2a9d8f"
        if c.key.startswith("nginx")
        else "#e9c46a"
        if c.key.startswith("bare")
        else "#e76f51"
        for c in configs.values()
    ]
    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    a.bar(names, rps, color=colors)
    a.set_ylabel("requests/s (median)")
    a.set_yscale("log")
    for i, v in enumerate(rps):
        a.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    b.bar(names, p99, color=colors)
    b.set_ylabel("p99 latency, ms (median)")
    for i, v in enumerate(p99):
        b.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    b.tick_params(axis="x", labelrotation=35, labelsize=8)
    fig.suptitle("wrk -t1 -c50, POST 1 KB JSON, 127.0.0.1 (medians of interleaved rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (
        (done.stdout + done.stderr).strip().splitlines()[0]
        if (done.stdout + done.stderr).strip()
        else "?"
    )


def write(
    path: Path,
    png: Path,
    *,
    command: str,
    configs: dict[str, Config],
    paced: dict[str, Config],
    pace_rps: float,
    micro: dict[str, float],
    nginx: str,
    wrk: str,
    seconds: float,
    rounds: int,
) -> list[str]:
    import os

    import aiohttp
    import orjson

    tg = targets(configs, paced, micro)
    upstream_cpu = configs["sidecrypt-pass-1"].med("upstream_cpu_us")
    lines = [
        "# sidecrypt benchmark results",
        "",
        f"Generated by `{command}` (see README.md). {rounds} interleaved rounds of {seconds:g} s "
        "per configuration; every figure is the median of the rounds, and every ratio is taken "
        "within this run.",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.platform()}, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"orjson {orjson.__version__}; {_version([nginx, '-v'])}; "
        f"{_version([wrk, '-v'])}.",
        "",
        "## Throughput at 50 connections (wrk -t1 -c50, POST 1 KB JSON)",
        "",
        *load_table(configs),
        "",
        "Upstream: nginx (1 worker) answering every request with the same 1 KB document whose "
        f"3 fields are already encrypted; its own CPU was {upstream_cpu:.0f} µs/req behind "
        "sidecrypt. The load generator, the upstream and the proxy share the machine's cores.",
        "",
        f"![requests/s and p99 per configuration]({png.name})",
        "",
        "## Where the machine's CPU went (µs per request, both cores)",
        "",
        *shares_table(configs),
        "",
        "Proxy and upstream from `/proc/<pid>/stat`, wrk from its rusage, idle from "
        "`/proc/stat`. With one worker the proxy fills one core and the rest of the machine "
        "idles; with two the machine is full, so two workers give at most "
        "2 x proxy(1) / (proxy + upstream + wrk)(2) of one: "
        f"{scaling_bound(configs['sidecrypt-pass-1'], configs['sidecrypt-pass-2']):.2f}x for "
        "pass-through here.",
        "",
        f"## Latency below saturation (50 connections paced to ~{pace_rps:,.0f} requests/s)",
        "",
        "| configuration | workers | requests/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for c in paced.values():
        lines.append(
            f"| {c.label} | {c.workers} | {c.med('rps'):,.0f} | {c.med('p50_ms'):.2f} "
            f"| {c.med('p99_ms'):.2f} |"
        )
    paced_rounds = len(next(iter(paced.values())).loads) if paced else 0
    lines += [
        "",
        f"Half the one-worker encrypting rate; {paced_rounds} interleaved rounds, medians. Each "
        "connection waits a fixed time between requests, so arrivals come in bursts: p99 here is "
        "mostly queueing behind a burst. nginx is the floor the load and machine set.",
        "",
        "## Micro benchmarks (in-process, best of 5)",
        "",
        "| operation | µs |",
        "|---|---|",
    ]
    lines += [f"| {k.replace(' (µs)', '')} | {v:.1f} |" for k, v in micro.items()]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in tg]
    lines.append("")
    path.write_text("\n".join(lines))
    plot(configs, png)
    return lines
