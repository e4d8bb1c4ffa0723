"""Shared fixtures: geometries and engine-side encoders for tests."""

from __future__ import annotations

import numpy as np
import pytest

from replay_bridge.geometry import RoutingGeometry


@pytest.fixture
def tiny() -> RoutingGeometry:
    return RoutingGeometry.from_preset("tiny-qwen3-moe")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
