"""Megatron tests run on a CPU-only torch under the CPU shims (test support only)."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (extra 'megatron')")


@pytest.fixture(scope="module")
def megatron_cpu():
    """CPU shims and a gloo world of one with megatron's parallel state, for one test module
    (what it created is undone after it)."""
    import torch

    from trainer_hooks.megatron.cpu_world import megatron_cpu_world

    with megatron_cpu_world(torch.get_num_threads()):
        yield
