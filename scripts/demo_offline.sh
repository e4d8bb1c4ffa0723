#!/usr/bin/env bash
# The offline pipeline on the example that ships with the repo: ingest -> validate -> inspect.
# The example holds faulty samples on purpose (PR #23885 zero prompt rows, duplicate ids, a
# dropped field, bad base64, an extra row): ingest quarantines them and exits 1; the stored
# shards then validate clean. The dataset (OUT, a directory or any dataset URI such as
# s3://bucket/prefix) holds only what the bridge writes: the heatmap goes next to it
# (PLOT, default OUT-expert-load.png for a local OUT, ./expert-load.png otherwise), and
# pyarrow.dataset reads the dataset's shards directly.
set -uo pipefail
cd "$(dirname "$0")/.."
RB=.venv/bin/replay-bridge
OUT="${1:-out/demo-offline}"
OUT="${OUT%/}"
case "$OUT" in
    *://*) PLOT="${2:-expert-load.png}" ;;
    *) PLOT="${2:-$OUT-expert-load.png}"
       rm -rf "$OUT"
       mkdir -p "$(dirname "$OUT")" ;;
esac
echo "== ingest examples/traffic/sglang-pd.jsonl"
$RB ingest examples/traffic/sglang-pd.jsonl --model tiny-qwen3-moe --engine sglang --out "$OUT"
code=$?
if [ "$code" -ne 1 ]; then
    echo "demo: expected ingest to reject the example's faulty samples (exit 1), got $code" >&2
    exit 1
fi
echo "== validate $OUT"
$RB validate "$OUT" || exit 1
echo "== inspect $OUT"
$RB inspect "$OUT" --plot "$PLOT" || exit 1
if [ -z "${OUT##*://*}" ]; then
    echo "demo: dataset $OUT, expert-load heatmap in $PLOT"
    exit 0
fi
echo "== pyarrow.dataset($OUT, format=arrow)"
.venv/bin/python - "$OUT" <<'PY' || exit 1
import sys
import pyarrow.dataset as ds
d = ds.dataset(sys.argv[1], format="arrow")
print(f"{d.count_rows()} rows in {len(d.files)} shard file(s); columns: "
      f"{', '.join(d.schema.names[:6])}, ...")
PY
echo "demo: dataset in $OUT, expert-load heatmap in $PLOT"
