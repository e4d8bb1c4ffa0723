"""Shared fixtures: geometries and engine-side encoders for tests; an S3-compatible server on
loopback (``s3_server``) and a fresh dataset URI per test, on a local directory and on that
server (``dataset_uri``)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest

from replay_bridge.geometry import RoutingGeometry


@pytest.fixture
def tiny() -> RoutingGeometry:
    return RoutingGeometry.from_preset("tiny-qwen3-moe")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def s3_server() -> Iterator["S3Server"]:  # noqa: F821 - tests.support.s3.S3Server
    """``moto``'s S3 server on a free loopback port, for the whole session (started by the
    first test that asks for it). Tests that talk to it take :func:`s3` instead."""
    from tests.support.s3 import s3_server as start

    with start() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    """The session's S3 server, with this test's environment (and so its child processes',
    ``tests.support.processes.child_env``) pointed at it: endpoint, dummy keys, region."""
    s3_server.apply(monkeypatch)
    return s3_server


@pytest.fixture(params=["local", "s3"])
def dataset_uri(request: pytest.FixtureRequest, tmp_path) -> str:  # noqa: ANN001
    """A fresh dataset URI nothing has written to: a local directory (``local``) or a unique
    prefix of a bucket of the loopback S3 server (``s3``; the environment points there)."""
    if request.param == "local":
        return str(tmp_path / "dataset")
    server = request.getfixturevalue("s3")
    label = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    return server.fresh_uri(label=label or "dataset")
