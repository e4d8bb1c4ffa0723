"""Megatron tests run on a CPU-only torch under the CPU shims (test support only)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

pytest.importorskip("megatron.core", reason="megatron-core is not installed (extra 'megatron')")


@pytest.fixture(scope="module")
def megatron_cpu():
    """CPU shims applied for one test module (undone after it), and a gloo world of one."""
    from trainer_hooks.megatron import cpu_compat

    import support

    shims = cpu_compat.apply()
    support.init_single_process()
    yield
    shims.undo()
