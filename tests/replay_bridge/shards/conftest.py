"""Sample factories for the shard tests."""

from __future__ import annotations

import numpy as np
import pytest

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample


def make_sample(geometry: RoutingGeometry, sample_id: str, num_tokens: int, *,
                prompt_len: int | None = None, routed_start: int = 0, seed: int = 0,
                logprobs: bool = True) -> RoutedSample:
    """A valid sample: distinct in-range ids per block, engine order random."""
    rng = np.random.default_rng(seed)
    prompt_len = num_tokens // 2 if prompt_len is None else prompt_len
    rows = max(num_tokens - 1 - routed_start, 0)
    m, k, e = geometry.num_moe_layers, geometry.top_k, geometry.num_experts
    keys = rng.random((rows, m, e), dtype=np.float32)
    routed = np.argsort(keys, axis=-1)[..., :k].astype(geometry.id_dtype)
    return RoutedSample(
        sample_id=sample_id,
        tokens=rng.integers(0, 151_000, num_tokens, dtype=np.int32),
        prompt_len=prompt_len,
        routed_start=routed_start,
        group_id=f"group-{seed % 3}",
        policy_version=seed % 5,
        logprobs=(-rng.random(num_tokens - prompt_len, dtype=np.float32)) if logprobs else None,
        engine="sglang",
        finish_reason="stop",
        weight_versions=[{"version": seed % 5, "start": 0, "end": num_tokens - prompt_len}],
        routed=routed,
    )


@pytest.fixture
def tiny() -> RoutingGeometry:
    return RoutingGeometry.from_preset("tiny-qwen3-moe")


@pytest.fixture
def samples(tiny: RoutingGeometry) -> list[RoutedSample]:
    return [make_sample(tiny, f"s{i:03d}", 8 + 3 * i, seed=i, logprobs=i % 3 != 0)
            for i in range(12)]
