#!/usr/bin/env bash
# Two data-parallel ranks (NCCL, one GPU each) train from one dataset with the rank loader and
# routing replay: rank 0 writes a dataset whose routing is the model's own at its initial
# weights (--make-demo-shards), both ranks plan every step from its index and read only their
# groups. Writes $OUT/ranks.json (per step: plan, ids read per rank, metrics, weight checksums)
# and $OUT/ranks.log. Expects the wheels of run_all.sh installed on PYTHONPATH.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
DATA=$(mktemp -d)/dataset
timeout 300 torchrun --nproc-per-node 2 -m replay_recipes.grpo_megatron \
    --routing-replay --make-demo-shards "$DATA" --routing-replay-shards "$DATA" \
    --steps 4 --groups-per-step 2 --seed 7 --log-json "$OUT/ranks.json" \
    2>&1 | grep -v -i "warn" | tee "$OUT/ranks.log"
exit "${PIPESTATUS[0]}"
