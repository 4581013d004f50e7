"""Issue 19's measurement: 200 records x 3 fields written with ``data_keys: {max_uses: 1}``,
then one list GET through a freshly started proxy; KMS calls counted at a front in front of
moto_server, and the GET's seconds (cold, then warm).

Run from the repository root: ``python -m bench.cold_list [--hierarchy] [--records N]``.
``--hierarchy`` gives the key branch keys on a sqlite store. Without it the script only uses
``config.parse`` and ``server.start``, so ``PYTHONPATH=OLD/src python -m bench.cold_list``
measures older code the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cold_list import measure
from kms_server import DUMMY_ENV, KmsServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hierarchy", action="store_true")
    parser.add_argument("--records", type=int, default=200)
    args = parser.parse_args()
    os.environ.update(DUMMY_ENV)
    with KmsServer() as kms, tempfile.TemporaryDirectory() as tmp:
        kms.create_key(alias="alias/app")
        extra = {}
        if args.hierarchy:
            extra = {
                "hierarchy": {"store": "main"},
                "stores": {"main": {"type": "sqlite", "path": "store.db"}},
            }
        result = asyncio.run(measure(kms.url, Path(tmp), records=args.records, **extra))
    result.pop("error", None)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
