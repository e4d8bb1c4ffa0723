"""More than 1,000 requests in flight against the light responder: the client's memory stays
bounded (it does not grow with the number of prompts)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support.processes import child_env, cli

IN_FLIGHT = 1200
SMALL, BIG = 6 * IN_FLIGHT, 12 * IN_FLIGHT
NEW_TOKENS = 500  # ~22 KB of base64 routing per answer (tiny geometry, int32 on the wire)


def collect(url: str, tmp_path: Path, n: int) -> dict:
    prompts = tmp_path / f"p{n}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "input_ids": [1 + i % 97, 2, 3]})
                               + "\n" for i in range(n)))
    done = subprocess.run(
        cli("collect", "--endpoint", url, "--engine", "sglang", "--prompts", str(prompts),
            "--model", "tiny-qwen3-moe", "--out", str(tmp_path / f"out{n}"),
            "--max-new-tokens", str(NEW_TOKENS), "--concurrency", str(IN_FLIGHT), "--json"),
        env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["totals"]


@pytest.mark.slow
def test_thousand_in_flight_bounded_memory(responder, tmp_path: Path, record_property) -> None:
    url = responder("sglang", delay=1.0)
    # Answers wait for the store thread in a queue as long as the number in flight, so the bound
    # is reached once the store falls behind, which takes a few seconds on a busy machine: both
    # sizes run long enough to reach it (2 x IN_FLIGHT did not always, and read as growth).
    small = collect(url, tmp_path, SMALL)
    with urllib.request.urlopen(url + "/stats") as r:
        stats = json.loads(r.read())
    assert stats["peak_in_flight"] >= 1000
    big = collect(url, tmp_path, BIG)
    assert small["stored"] == SMALL and big["stored"] == BIG
    mib = 1 << 20
    peak_small, peak_big = small["peak_rss_bytes"] / mib, big["peak_rss_bytes"] / mib
    record_property("peak_rss_mib", {str(SMALL): round(peak_small, 1), str(BIG): round(peak_big, 1),
                                     "peak_in_flight": stats["peak_in_flight"]})
    print(f"\npeak client RSS: {peak_small:.1f} MiB for {SMALL} prompts, "
          f"{peak_big:.1f} MiB for {BIG}; {stats['peak_in_flight']} in flight")
    # 7,200 more answers of ~22 KB (+ their decoded routing) held at once would add > 150 MiB.
    assert peak_big - peak_small < 50
    assert peak_big < 600
