"""A local multi-node Ray cluster (Ray's own ``ray.cluster_utils.Cluster``: a head and a second
node on this machine, small CPU counts and object stores), started once per test module and
joined by the test process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

NODE = {"num_cpus": 2, "object_store_memory": 128 * 2**20}


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """Two Ray nodes on this machine; the test process is connected to them (namespace
    ``replay_bridge``: the collectors' names can be looked up)."""
    from ray.cluster_utils import Cluster

    from replay_bridge.ray import NAMESPACE

    c = Cluster(initialize_head=True, head_node_args=dict(NODE))
    c.add_node(**NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
