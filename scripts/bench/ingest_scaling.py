"""``bench ingest`` with ``--workers W`` on a many-core host, without the CLI (its packages
need not be installed there): the allocator setting the CLI makes, then one run per W.

    OUT=out python scripts/bench/ingest_scaling.py 2 4 8 16

Writes ``$OUT/ingest-workers-<W>.json`` and prints floor, one-process and W-process figures.
Recorded runs: ``scripts/gpu/results/ingest-workers-*-16core.json`` (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import sys

from replay_bridge.allocator import keep_freed_memory
from replay_bridge.benchmarks.ingest import run

if __name__ == "__main__":  # the workers import this file
    keep_freed_memory()
    for w in map(int, sys.argv[1:] or ["2", "4", "8"]):
        d = run(tokens=800_000, repeats=3, peer=False, busy=False, workers=w,
                workdir=os.environ.get("WORKDIR", "/dev/shm"))
        with open(os.path.join(os.environ.get("OUT", "."), f"ingest-workers-{w}.json"), "w") as f:
            json.dump(d, f, indent=1)
        print(w, d["floor_b64decode_s"], d["ingest_s"], d["ingest_over_floor"],
              d["workers"]["ingest_s"], d["workers"]["ingest_over_floor"], flush=True)
