"""A kernel given as a ``jax.Array`` sharded over 4 CPU devices (rows over a mesh axis).

In a subprocess (JAX needs the device count before it starts), for an Explicit and an
Auto mesh: products are computed where the kernel's rows live (the compiled product
multiplies a ``(N/4, N)`` shard per device and never holds the whole kernel); on the
Explicit mesh (``jax.make_mesh``'s default) the predictors on the sharded kernel equal
those on the same kernel as a numpy array.
"""

import json
import os
import subprocess
import sys

SHARDED = """
import json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from ntk_dist.linalg import operator
from ntk_dist.predict import gradient_descent, gradient_descent_mse
from ntk_dist.predict.kernel_matrix import as_kernel_operator

n, out = 48, {"devices": len(jax.local_devices())}
g = np.random.default_rng(0).standard_normal((n, 2, 8))
kernel = np.einsum("iap,jbp->ijab", g, g) / 8 + np.einsum("ij,ab->ijab", np.eye(n), np.eye(2))
matrix = kernel.transpose(0, 2, 1, 3).reshape(2 * n, 2 * n)  # the 2-D form, by numpy
y = np.random.default_rng(1).standard_normal((n, 2))
rhs = np.random.default_rng(2).standard_normal((2 * n, 3))

def loss(fx, y):
    return 0.5 * jnp.mean((fx - y) ** 2)

def differences(train, test):
    mse = gradient_descent_mse(train, y, diag_reg=1e-3, trace_axes=())
    ode = gradient_descent(loss, train, y, trace_axes=())
    return [
        *mse(None, 0.0, 0.0, test),
        *mse(np.array([0.5, 2.0]), 0.0, 0.0, test),
        ode(np.array([0.5, 2.0]), 0.0),
    ]

for mode in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((4,), ("rows",), axis_types=(mode,))
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    op = as_kernel_operator(jax.device_put(kernel, rows), "k")
    product = op.matmul(rhs)
    replicated = jax.device_put(rhs, NamedSharding(mesh, PartitionSpec()))
    hlo = operator._sharded_matmul(op.matrix.sharding).lower(op.matrix, replicated)
    hlo = hlo.compile().as_text()
    out[mode.name] = {
        "matrix_rows_axis": op.matrix.sharding.spec[0],
        "matrix_devices": len(op.matrix.sharding.device_set),
        "product_devices": len(product.sharding.device_set),
        "product_error": float(np.abs(np.asarray(product) - matrix @ rhs).max()),
        "diagonal_error": float(np.abs(np.asarray(op.diagonal()) - np.diag(matrix)).max()),
        "local_dot": "f64[24,3]{1,0} dot(" in hlo,
        "whole_kernel_in_hlo": "f64[96,96]" in hlo,
    }
    if mode == AxisType.Explicit:  # what jax.make_mesh gives by default
        sharded = differences(jax.device_put(kernel, rows), jax.device_put(kernel[:16], rows))
        out[mode.name]["prediction_errors"] = [
            float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
            for a, b in zip(sharded, differences(kernel, kernel[:16]), strict=True)
        ]
print(json.dumps(out))
"""


def test_sharded_kernel_products_stay_sharded_and_predictions_match(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["devices"] == 4
    for mode in ("Explicit", "Auto"):
        got = out[mode]
        assert got["matrix_rows_axis"] == "rows" and got["matrix_devices"] == 4
        assert got["product_devices"] == 4  # not gathered onto one device
        assert got["product_error"] <= 1e-12 and got["diagonal_error"] == 0.0
        assert got["local_dot"] and not got["whole_kernel_in_hlo"], mode  # 24 of 96 rows each
    errors = out["Explicit"]["prediction_errors"]  # mse at t = inf and two t, the ODE
    assert len(errors) == 5 and max(errors) <= 1e-9, errors
