"""Start a multi-node Ray cluster on this one machine, for trying ntk_dist's Ray mode.

  python cluster/local_cluster.py --nodes 2              # serve until Ctrl-C
  python cluster/local_cluster.py --nodes 2 --check      # compute a small kernel, exit

While it serves, other terminals connect with the printed address, e.g.
``RayExecutor(address=ADDRESS)`` or ``ntk-dist kernel ... --ray ADDRESS``.
``--check`` computes a small NTK into a temporary store through the cluster,
compares it with one in-memory call and prints which node computed each tile.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter

import numpy as np
import ray
from ray.cluster_utils import Cluster


def check() -> None:
    """A small kernel through the cluster: tiles per node and the error against one call."""
    import jax

    import ntk_dist
    from ntk_dist import models
    from ntk_dist.executors import RayExecutor

    f, params = models.mlp(jax.random.PRNGKey(0), 8, [64, 3])
    ntk_fn = ntk_dist.empirical_ntk_fn(f, trace_axes=(-1,))
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (40, 8)), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        store = ntk_dist.compute_kernel(
            ntk_fn, x, None, params, block_size=8, store=f"{tmp}/k", executor=RayExecutor()
        )
        ref = np.asarray(ntk_fn(x, None, params))
        err = np.abs(store.to_numpy() - ref).max() / np.abs(ref).max()
        per_node = Counter(r["node"][:12] for r in store.tile_records().values())
    print(f"tiles per node: {dict(per_node)}; relative error vs one call: {err:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="run a small kernel and exit")
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus_per_node)
        cluster.wait_for_nodes(timeout=120)
        print(f"Ray cluster of {args.nodes} nodes at {cluster.address}", flush=True)
        if args.check:
            ray.init(address=cluster.address, log_to_driver=False)
            check()
            return
        print("connect with RayExecutor(address=...) or --ray ADDRESS; Ctrl-C stops it")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
