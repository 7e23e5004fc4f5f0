"""A real two-node local Ray cluster for tests (``ray.cluster_utils.Cluster``, 1 CPU a node)."""

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def two_node_cluster() -> Iterator[object]:
    """Start the cluster, connect this process to it, and tear both down however the body ends."""
    import ray
    from ray.cluster_utils import Cluster

    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        head.add_node(num_cpus=1)
        head.wait_for_nodes(timeout=60)
        ray.init(address=head.address, log_to_driver=False)
        yield head
    finally:
        ray.shutdown()
        head.shutdown()


def alive_nodes() -> set[str]:
    """Node ids of the live nodes of the connected cluster."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}
