#!/usr/bin/env bash
# Create .venv-sglang-router in the checkout: SGLang's own PD router (PyPI sglang-router 0.3.2,
# whose mini load balancer has no routed-experts merge) for tests/reference_engine/test_sglang_router.py
# and tests/e2e/test_sglang_router.py.
# Small (no torch): sglang-router, fastapi, uvicorn, aiohttp. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SGLANG_ROUTER_VENV:-.venv-sglang-router}"
PY="${PYTHON:-python3}"
VERSION="0.3.2"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "
import importlib.metadata as m, sys
assert m.version('sglang-router') == '$VERSION'
import sglang_router.mini_lb  # noqa: F401
" >/dev/null 2>&1; then
    echo "sglang_router_env: $VENV already has sglang-router $VERSION" >&2
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "sglang-router==$VERSION"
echo "sglang_router_env: ready ($VENV, sglang-router $VERSION)" >&2
