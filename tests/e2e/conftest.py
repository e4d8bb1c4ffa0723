"""End-to-end fixtures: the reference engine's tiny model, an independent transformers
reference, and light responders in their own processes (the process helpers themselves are in
``tests/support/processes.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from tests.support.processes import loopback_responder


@pytest.fixture
def responder() -> Iterator[Callable[..., str]]:
    """Start light responders (own processes); all are stopped at the end of the test."""
    with contextlib.ExitStack() as running:
        def start(engine: str = "sglang", model: str = "tiny-qwen3-moe", delay: float = 0.0) -> str:
            return running.enter_context(loopback_responder(engine, model, delay))

        yield start


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers", reason="the reference engine needs the 'server' extra")
    from reference_engine import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@lru_cache(maxsize=2)
def _hf_model(model_dir: str):  # noqa: ANN202
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def transformers_routing(model_dir: Path, tokens: np.ndarray, top_k: int = 2) -> np.ndarray:
    """Top-k expert ids of every token position and MoE layer from a plain transformers
    forward pass (``output_router_logits``), float32: ``[len(tokens), layers, top_k]``."""
    import torch

    model = _hf_model(str(model_dir))
    with torch.inference_mode():
        out = model(torch.tensor([np.asarray(tokens).tolist()]), output_router_logits=True)
    return np.stack([torch.topk(logits.float(), top_k, dim=-1).indices.numpy()
                     for logits in out.router_logits], axis=1)
