"""Fixtures for the reference engine: one tiny model per session, servers on free ports."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the reference engine needs the 'server' extra")

from reference_engine import (  # noqa: E402
    ModelRunner,
    PDUrls,
    in_background,
    make_tiny_model,
    serve_pd,
    serve_worker,
)

NUM_LAYERS, TOP_K = 4, 2


def post(url: str, body: Any) -> tuple[int, Any]:
    """POST JSON; return (status, decoded JSON body)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def post_stream(url: str, body: Any) -> list[Any]:
    """POST a streaming request; return the decoded SSE ``data:`` chunks before ``[DONE]``."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read().decode()
    chunks = [line[len("data: "):] for line in raw.split("\n") if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def routing(value: str) -> np.ndarray:
    """Decode SGLang's routed_experts exactly as protocol.md says: base64 of LE int32."""
    return np.frombuffer(base64.b64decode(value), dtype="<i4").reshape(-1, NUM_LAYERS, TOP_K)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-moe"))


@pytest.fixture(scope="session")
def runner(tiny_model_dir: Path) -> ModelRunner:
    """float32, so that KV-cache generation and a full forward pass agree exactly."""
    return ModelRunner(tiny_model_dir, dtype="float32")


@pytest.fixture(scope="session")
def unified(runner: ModelRunner) -> Iterator[str]:
    with in_background(serve_worker(runner)) as url:
        yield url


@pytest.fixture(scope="session")
def pd(runner: ModelRunner) -> Iterator[PDUrls]:
    with in_background(serve_pd(runner)) as urls:
        yield urls
