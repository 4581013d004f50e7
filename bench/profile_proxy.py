"""Deterministic profile of one sidecrypt process under load (cProfile), for bench/PROFILE.md.

py-spy samples wall-clock stacks; on 2 cores shared with wrk and nginx it charges scheduler
preemption to whatever line made the last syscall, which misled an earlier round of work. cProfile
counts calls and per-function time inside the process (inflated for small Python functions, so
read it for call counts and for the relative weight of large pieces).

Usage (with ``python -m bench --hold 300 --only none`` running, so the upstream is up):

    python -m bench.profile_proxy CONFIG.yaml [SECONDS]   # listens where CONFIG says
    wrk -t1 -c50 -d10s -s post.lua https://127.0.0.1:PORT/records/1   # in another shell
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import pstats
import sys


async def _run(config_path: str, seconds: float) -> cProfile.Profile:
    from sidecrypt import config
    from sidecrypt.proxy import server

    settings = config.load(config_path)
    _, stop = await server.start(settings, admin=False)
    gc.freeze()
    print(f"profile: listening on {settings.listen.address}; profiling for {seconds:g} s after 3 s")
    await asyncio.sleep(3)
    profile = cProfile.Profile()
    profile.enable()
    await asyncio.sleep(seconds)
    profile.disable()
    await stop()
    return profile


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    import uvloop

    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 6.0
    profile = uvloop.run(_run(sys.argv[1], seconds))
    pstats.Stats(profile).sort_stats("tottime").print_stats(
        int(__import__("os").environ.get("NSTATS", "40"))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
