"""Where the workers of one ``sidecrypt run`` find each other.

With ``server.workers: N`` the proxy port is shared (SO_REUSEPORT) and the admin listener runs
in worker 0. Workers 1..N-1 serve their admin app on a Unix socket in a directory only this
user can enter, so that worker 0 can answer ``/metrics`` for all of them
(plugins/metrics_workers.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# sun_path holds 108 bytes on Linux (104 on macOS): a longer TMPDIR cannot hold the sockets.
MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class Worker:
    index: int
    count: int
    rundir: Path  # made by the master process with mode 0700, removed when it exits

    def socket(self, index: int) -> Path:
        return self.rundir / f"w{index}.sock"

    def peers(self) -> list[int]:
        """The other workers, as worker 0 asks them."""
        return [i for i in range(self.count) if i != self.index]
