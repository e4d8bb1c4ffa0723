"""A local multi-node Ray cluster (Ray's own ``ray.cluster_utils.Cluster``: a head and a second
node on this machine, small CPU counts and object stores), started once per test module and
joined by the test process. A module that sets ``CLUSTER_WITH_S3 = True`` gets the cluster
started in an environment pointed at the loopback S3 server (the Ray workers inherit it, as
they would a node's credentials)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

NODE = {"num_cpus": 2, "object_store_memory": 128 * 2**20}


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[object]:
    """Two Ray nodes on this machine; the test process is connected to them (namespace
    ``replay_bridge``: the collectors' names can be looked up)."""
    from ray.cluster_utils import Cluster

    from replay_bridge.ray import NAMESPACE

    with pytest.MonkeyPatch.context() as env:
        if getattr(request.module, "CLUSTER_WITH_S3", False):
            request.getfixturevalue("s3_server").apply(env)
        yield from _cluster(Cluster, NAMESPACE)


def _cluster(cluster_cls: type, namespace: str) -> Iterator[object]:
    c = cluster_cls(initialize_head=True, head_node_args=dict(NODE))
    c.add_node(**NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=namespace, log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
