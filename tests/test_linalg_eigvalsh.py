"""KernelOperator.eigvalsh in memory and of stores in and out of core, against LAPACK."""

import jax.numpy as jnp
import numpy as np
import pytest
from linalg_helpers import count_calls, ntk_train, store_kernel, stored_case, to_2d

from ntk_dist.linalg import DenseKernelOperator, StoredKernelOperator
from ntk_dist.linalg import eigh as eig
from ntk_dist.store import KernelStore


def test_in_memory_eigvalsh_matches_lapack_and_is_cached():
    k = ntk_train(40)
    a = to_2d(k)
    op = DenseKernelOperator.from_kernel(jnp.asarray(k))
    np.testing.assert_allclose(
        op.eigvalsh(), np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * np.linalg.norm(a, 2)
    )
    op.eigvalsh()
    assert op.factorizations == {"eigvalsh": 1}


@pytest.mark.parametrize("where", ["in core", "out of core"])
@pytest.mark.parametrize("name", ["ntk", "ill"])
def test_stored_eigvalsh_matches_lapack_and_is_stored(tmp_path, monkeypatch, where, name):
    a, store = stored_case(tmp_path / "k", name, 150, 230, 64)  # ragged blocks and tiles
    n = len(a)
    calls = {"band_eigenvalues": 0}
    count_calls(monkeypatch, eig, "band_eigenvalues", calls)
    bound = 4 * n * n * 8 if where == "in core" else n * n * 8 // 2
    op = StoredKernelOperator(store, memory_bound=bound)
    w = np.asarray(op.eigvalsh())
    norm = np.linalg.norm(a, 2)
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * norm)
    assert calls == {"band_eigenvalues": int(where == "out of core")}
    assert op.factorizations == {"eigvalsh": 1}
    assert not any(p.name.endswith("-scratch") for p in tmp_path.rglob("*"))  # scratch gone

    again = StoredKernelOperator(KernelStore.open(tmp_path / "k"), memory_bound=bound)
    np.testing.assert_array_equal(np.asarray(again.eigvalsh()), w)
    assert again.factorizations == {} and again.reused == {"eigvalsh": 1}
    shifted = again.add_to_diagonal(0.5)  # another kernel: computed, not reused
    np.testing.assert_allclose(shifted.eigvalsh(), w + 0.5, rtol=0, atol=1e-12 * norm)
    assert shifted.factorizations == {"eigvalsh": 1}


def test_eigvalsh_takes_the_values_of_a_stored_eigh(tmp_path):
    k = ntk_train(60)
    store = store_kernel(tmp_path / "k", k, block=32)
    first = StoredKernelOperator(store)
    w = np.asarray(first.eigh().values)
    np.testing.assert_array_equal(np.asarray(first.eigvalsh()), w)  # the cached eigh's
    later = StoredKernelOperator(KernelStore.open(tmp_path / "k"))
    np.testing.assert_array_equal(np.asarray(later.eigvalsh()), w)
    assert later.factorizations == {} and later.reused == {"eigvalsh": 1}
