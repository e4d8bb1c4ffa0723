"""The benchmark's synthetic routing: valid, skewed as configured, correlated in time."""

from __future__ import annotations

import numpy as np

from replay_bridge.benchmarks.routing_model import RoutingModel
from replay_bridge.checks import check_routed
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample


def _overlap(r: np.ndarray) -> float:
    """Mean experts shared by neighbouring tokens' blocks."""
    a, b = r[:-1], r[1:]
    return float((a[..., :, None] == b[..., None, :]).any(-1).sum(-1).mean())


def test_routing_is_valid_skewed_and_sticky():
    g = RoutingGeometry.from_preset("qwen3-30b-a3b")
    r = RoutingModel(g, zipf_s=0.5, stickiness=0.3, seed=1).routing(3000)
    assert r.shape == (3000, 48, 8) and r.dtype == np.uint8
    sample = RoutedSample("x", tokens=np.zeros(3001, np.int32), prompt_len=1000, routed=r)
    assert check_routed(sample, g).ok  # distinct, in range, no all-zero block
    flat = RoutingModel(g, zipf_s=0.0, stickiness=0.0, seed=1).routing(3000)
    load = np.stack([np.bincount(r[:, i].ravel(), minlength=128) for i in (0, 47)])
    flat_load = np.bincount(flat[:, 0].ravel(), minlength=128)
    assert (load.max(1) / load.mean(1)).min() > 3.0  # Zipf(0.5) over 128 experts
    assert flat_load.max() / flat_load.mean() < 1.5
    assert _overlap(r) > _overlap(flat) + 1.0  # neighbours share experts
    assert abs(_overlap(flat) - 8 * 8 / 128) < 0.1  # independent draws: k^2 / E
