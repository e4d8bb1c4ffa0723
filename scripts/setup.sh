#!/usr/bin/env bash
# Create .venv in the checkout and install the bridge with everything its tests and demo need:
# the extras `all` (Ray included) and `test` (pytest, moto's S3-compatible server for the storage
# suite on S3, boto3).
# torch: a machine that already has an importable torch keeps it; otherwise torch==2.13.0 is
# installed first (pip takes a local CPU wheel where one lies in its find-links), so that no
# later requirement pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --upgrade pip
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: no torch in .venv; installing torch==2.13.0" >&2
    "$VPY" -m pip install --quiet "torch==2.13.0"
fi
"$VPY" -m pip install --quiet -e ".[all,test]"
# The S3 storage suite and the Ray tests run in CI: fail here, not as skips, when they cannot.
"$VPY" -c "import moto.server, boto3, ray, pyarrow.fs; pyarrow.fs.S3FileSystem" || {
    echo "setup: moto[server], boto3, ray or pyarrow's S3 support is missing from .venv" >&2
    exit 1
}
"$VPY" -c "import replay_bridge._blockscan" 2>/dev/null || \
    echo "setup: the checks' compiled scan was not built (no C compiler or Python headers?);" \
         "the checks run on NumPy" >&2
echo "setup: ready ($("$VPY" -c 'import torch, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")'))" >&2
