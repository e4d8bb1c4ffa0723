#!/usr/bin/env bash
# Every GPU check of the router replay hook in one call on a 2-GPU machine:
# the multi-rank layouts and two ranks training from one dataset over NCCL (when 2 GPUs are
# present), then the overhead benchmark on
# GPU 0, without and with full activation recompute, and the Hugging Face hook's overhead
# benchmark (scripts/gpu/hf_replay_overhead.py) on GPU 0.
# Expects megatron-core 0.16.1, transformers 5.24.0 (and pyarrow, orjson, pybase64 for
# replay_bridge) as wheels in .whl/ (carried); writes results under $OUT (or ./out/gpu).
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__, 'gpus', torch.cuda.device_count())"
  python3 -c "import transformer_engine" 2>/dev/null && echo "transformer_engine present" || echo "transformer_engine absent"
} 2>&1 | tee "$OUT/env.txt"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
rc=0
if [ "$NGPU" -ge 2 ]; then
  timeout 300 torchrun --nproc-per-node 2 scripts/gpu/replay_layouts.py --out "$OUT/layouts.json" \
      2>&1 | grep -v -i "warn" | tee "$OUT/layouts.log" || rc=1
  bash scripts/gpu/ranks_from_dataset.sh || rc=1
fi
timeout 240 python3 scripts/gpu/replay_overhead.py --out "$OUT/overhead.json" "$@" \
    2>&1 | grep -v -i "warn" | tee "$OUT/overhead.log" || rc=1
timeout 240 python3 scripts/gpu/replay_overhead.py --recompute --out "$OUT/overhead_recompute.json" "$@" \
    2>&1 | grep -v -i "warn" | tee "$OUT/overhead_recompute.log" || rc=1
timeout 300 python3 scripts/gpu/hf_replay_overhead.py --json "$OUT/hf-overhead.json" \
    2>&1 | grep -v -i "warn" | tee "$OUT/hf-overhead.log" || rc=1
exit $rc
