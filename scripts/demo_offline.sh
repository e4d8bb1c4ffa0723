#!/usr/bin/env bash
# The offline pipeline on the example that ships with the repo: ingest -> validate -> inspect.
# The example holds faulty samples on purpose (PR #23885 zero prompt rows, duplicate ids, a
# dropped field, bad base64, an extra row): ingest quarantines them and exits 1; the stored
# shards then validate clean.
set -uo pipefail
cd "$(dirname "$0")/.."
RB=.venv/bin/replay-bridge
OUT="${1:-out/demo-offline}"
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
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
$RB inspect "$OUT" --plot "$OUT/expert-load.png" || exit 1
echo "demo: shards in $OUT, expert-load heatmap in $OUT/expert-load.png"
