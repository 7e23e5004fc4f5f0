"""Quick start: the neural-tangents workflow, with ``import ntk_dist as nt``.

Computes the NTK of a small MLP on a toy regression problem, predicts the
outputs of gradient descent at several times, and checks the prediction against
real gradient descent on the linearized network.

Run: ``.venv/bin/python examples/quickstart.py``
"""

import jax
import jax.numpy as jnp
import numpy as np

import ntk_dist as nt
from ntk_dist import models

jax.config.update("jax_enable_x64", True)

key_data, key_params = jax.random.split(jax.random.PRNGKey(0))
x_train = jax.random.normal(key_data, (20, 3))
y_train = jnp.sin(x_train.sum(-1, keepdims=True))
x_test = jnp.linspace(-2, 2, 7)[:, None] * jnp.ones((1, 3))

f, params = models.mlp(key_params, 3, (256, 256, 1), activation="erf", dtype=jnp.float64)
ntk_fn = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0)
k_train_train = ntk_fn(x_train, None, params)  # shape (20, 20, 1, 1)
k_test_train = ntk_fn(x_test, x_train, params)

lr = nt.predict.max_learning_rate(k_train_train) / 2
predict_fn = nt.predict.gradient_descent_mse(k_train_train, y_train, lr, trace_axes=())
steps = np.array([0, 10, 100, 1000])
fx_0 = (f(params, x_train), f(params, x_test))
fx_train_t, fx_test_t = predict_fn(steps, *fx_0, k_test_train)

# Real (discrete) gradient descent on the linearized network, loss 0.5 * mean((f - y)^2).
f_lin = nt.linearize(f, params)
loss = lambda p: 0.5 * jnp.mean((f_lin(p, x_train) - y_train) ** 2)  # noqa: E731
step = jax.jit(lambda p: jax.tree.map(lambda w, g: w - lr * g, p, jax.grad(loss)(p)))
p = params
for _ in range(1000):
    p = step(p)

print("train loss predicted at", steps.tolist(), "steps:")
print(np.round(0.5 * np.mean((np.asarray(fx_train_t) - np.asarray(y_train)) ** 2, (1, 2)), 6))
print("after 1000 real steps on the linearized network:", round(float(loss(p)), 6))
print("test predictions at 1000 steps:", np.round(np.asarray(fx_test_t[-1, :, 0]), 3))
