"""Tiled Cholesky across a real two-node local Ray cluster, against numpy LAPACK."""

import numpy as np
import pytest
from linalg_helpers import ill_conditioned, rel, store_kernel
from ray_cluster import alive_nodes, two_node_cluster

from ntk_dist.linalg import NotPositiveDefiniteError, StoredKernelOperator
from ntk_dist.linalg.cholesky import PANELS
from ntk_dist.linalg.ray_cholesky import ray_cholesky
from ntk_dist.store import KernelStore


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster() as head:
        yield head


def test_ray_cholesky_on_two_nodes_matches_lapack_and_is_reused(tmp_path, cluster):
    a = ill_conditioned(90, cond=1e8)
    store = store_kernel(tmp_path / "k", a, block=7)  # store blocks do not align with tiles
    result = ray_cholesky(StoredKernelOperator(store), tile=23)  # ragged: 4 block columns
    assert result.nodes == alive_nodes() and len(result.nodes) == 2
    assert result.columns == 4
    lower = result.factor.to_dense()
    assert rel(lower @ lower.T, a) <= 1e-12
    np.testing.assert_allclose(lower, np.linalg.cholesky(a), rtol=0, atol=1e-10 * np.abs(a).max())
    op = StoredKernelOperator(KernelStore.open(tmp_path / "k"))
    np.testing.assert_array_equal(op.cholesky().to_dense(), lower)
    assert op.reused == {"cholesky": 1} and op.factorizations == {}
    again = ray_cholesky(StoredKernelOperator(store), tile=23)  # everything is in the ledger
    assert again.columns == 0 and again.nodes == set()


def test_ray_cholesky_names_the_failing_pivot(tmp_path, cluster):
    a = ill_conditioned(60, cond=10)
    a[41, :] = a[:, 41] = 0.0
    a[41, 41] = -1.0
    store = store_kernel(tmp_path / "k", a, block=8)
    with pytest.raises(NotPositiveDefiniteError, match=r"pivot 41 .*diag_reg"):
        ray_cholesky(StoredKernelOperator(store), tile=16)


def test_ray_cholesky_resumes_a_local_factorisation(tmp_path, cluster):
    a = ill_conditioned(90, cond=1e6)
    store = store_kernel(tmp_path / "k", a, block=9)

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt  # the local run stops after 2 of 4 block columns

    bound = PANELS * 90 * 8 * 23  # tiles of 23, as below
    with pytest.raises(KeyboardInterrupt):
        StoredKernelOperator(store, memory_bound=bound, progress=stop_after_two).cholesky()
    result = ray_cholesky(StoredKernelOperator(store), tile=23)
    assert result.columns == 2 and result.nodes == alive_nodes()
    lower = result.factor.to_dense()
    assert rel(lower @ lower.T, a) <= 1e-12
