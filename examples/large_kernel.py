"""A stored kernel larger than the memory you allow: its spectrum, and predictions.

The NTK of an MLP on scikit-learn's 1 797 digits goes to a Zarr store; the operator
over it may hold half the kernel (``memory_bound``), so every factorisation runs out of
core. Then:

1. ``eigvalsh()``: its exact eigenvalues alone (reduction to band form, 4/3 N^3 flops);
2. ``method="krylov"``: test predictions at a few training times without factorising
   anything (a block Krylov space of the residual, one pass over the store per step;
   its basis is held in memory, so the bound gets room for 600 vectors);
3. ``method="eigh"``: the same predictions from the eigendecomposition, computed once
   out of core and stored beside the kernel, so that later runs only read it.

The two predictions must agree to 1e-9; the script says how long each took.

Run: ``.venv/bin/python examples/large_kernel.py [--n 1797] [--folder out/large_kernel]``
"""

import argparse
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ntk_dist as nt
from ntk_dist import models
from ntk_dist.demo import load_digits
from ntk_dist.linalg import StoredKernelOperator

jax.config.update("jax_enable_x64", True)


def main(n: int, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    x_train, y_train, x_test, _, labels = load_digits(n - n // 5, n // 5)
    f, params = models.mlp(jax.random.PRNGKey(0), 64, (256, 256, 10), dtype=jnp.float64)
    ntk_fn = nt.empirical_ntk_fn(f, vmap_axes=0, implementation=nt.NtkImplementation.AUTO)
    x_train, x_test = jnp.asarray(x_train, jnp.float64), jnp.asarray(x_test, jnp.float64)
    kw = {"block_size": 512, "progress": False}
    train = nt.compute_kernel(ntk_fn, x_train, None, params, store=folder / "train.zarr", **kw)
    test = nt.compute_kernel(ntk_fn, x_test, x_train, params, store=folder / "test.zarr", **kw)
    bound = len(x_train) ** 2 * 8 // 2  # half the kernel: nothing is factorised in core

    start = time.perf_counter()
    values = np.asarray(StoredKernelOperator(train, memory_bound=bound).eigvalsh())
    took = time.perf_counter() - start
    print(f"spectrum of the {len(values)} x {len(values)} NTK, out of core ({took:.1f} s):")
    print(
        f"  largest {values[-1]:.4g}, smallest {values[0]:.4g}, ratio {values[-1] / values[0]:.3g}"
    )
    lr = nt.predict.max_learning_rate(StoredKernelOperator(train, memory_bound=bound), y_train.size)
    times = np.array([1.0, 10.0, 100.0])
    predictions = {}
    basis = len(x_train) * 8 * 600  # method="krylov" keeps up to 600 vectors beside K's tiles
    for method in ("krylov", "eigh"):
        op = StoredKernelOperator(train, memory_bound=bound + (basis if method == "krylov" else 0))
        predict = nt.predict.gradient_descent_mse(op, y_train, lr, diag_reg=1e-4, method=method)
        start = time.perf_counter()
        predictions[method] = np.asarray(predict(times, None, 0.0, test))
        print(f"method={method!r}: {time.perf_counter() - start:.1f} s")
    gap = np.abs(predictions["krylov"] - predictions["eigh"]).max()
    assert gap <= 1e-9 * np.abs(predictions["eigh"]).max(), f"methods differ by {gap:.3g}"
    for t, p in zip(times, predictions["eigh"], strict=True):
        print(f"t = {t:6g} steps: test accuracy {np.mean(p.argmax(-1) == labels):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1797, help="digits used (train + test)")
    parser.add_argument("--folder", type=Path, default=Path("out/large_kernel"))
    args = parser.parse_args()
    main(args.n, args.folder)
