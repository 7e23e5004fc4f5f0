"""The main job in miniature: NTK of a small CNN on real digits, then predictions.

Uses scikit-learn's bundled 8x8 digits (1 797 real handwritten images, no
download). Computes the empirical NTK of a two-layer CNN on a few hundred
training images, predicts the network's outputs under gradient descent on MSE at
several training times and at infinity, prints test accuracy and loss per time,
and saves a plot.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist import models, predict
from ntk_dist.empirical import NtkImplementation, empirical_ntk_fn


@dataclass(frozen=True)
class DemoResult:
    """Per-time metrics of the predicted training run (time in gradient steps)."""

    steps: list[float]
    train_loss: list[float]
    test_loss: list[float]
    test_accuracy: list[float]


def load_digits(n_train: int, n_test: int, seed: int = 0):
    """Split scikit-learn's digits into standardised NHWC images and centred one-hot targets."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    if n_train + n_test > len(data.target):
        raise ValueError(
            f"n_train + n_test = {n_train + n_test} exceeds the {len(data.target)} digits; "
            "ask for fewer examples"
        )
    order = np.random.default_rng(seed).permutation(len(data.target))
    images = data.images[order].astype(np.float32)[..., None]
    images = (images - images.mean()) / images.std()
    targets = np.eye(10, dtype=np.float32)[data.target[order]] - 0.1
    labels = data.target[order]
    train, test = slice(0, n_train), slice(n_train, n_train + n_test)
    return images[train], targets[train], images[test], targets[test], labels[test]


def run_demo(
    n_train: int = 300,
    n_test: int = 300,
    out_dir: str | Path = "out",
    seed: int = 0,
    plot: bool = True,
) -> DemoResult:
    """Run the demo end to end and return the metrics it printed."""
    x_train, y_train, x_test, y_test, test_labels = load_digits(n_train, n_test, seed)
    f, params = models.cnn(jax.random.PRNGKey(seed), (8, 8, 1), (32, 32), 10, padding="SAME")

    ntk_fn = jax.jit(
        empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=NtkImplementation.AUTO)
    )
    start = time.perf_counter()
    k_train_train = np.asarray(ntk_fn(x_train, None, params))
    k_test_train = np.asarray(ntk_fn(x_test, x_train, params))
    elapsed = time.perf_counter() - start
    n_entries = k_train_train.size + k_test_train.size
    print(
        f"NTK of a {len(params['convs'])}-conv CNN on {n_train} train / {n_test} test digits: "
        f"{n_entries:,} entries in {elapsed:.1f} s"
    )

    lr = 0.5 * float(predict.max_learning_rate(k_train_train, y_train_size=y_train.size))
    predict_fn = predict.gradient_descent_mse(
        k_train_train, y_train, learning_rate=lr, diag_reg=1e-4
    )
    fx_train_0 = np.asarray(f(params, x_train))
    fx_test_0 = np.asarray(f(params, x_test))

    steps = np.array([0.0, 1e1, 1e2, 1e3, 1e4, 1e5])
    fx_train_t, fx_test_t = predict_fn(steps, fx_train_0, fx_test_0, k_test_train)
    fx_train_inf, fx_test_inf = predict_fn(None, fx_train_0, fx_test_0, k_test_train)
    train_all = np.concatenate([np.asarray(fx_train_t), np.asarray(fx_train_inf)[None]])
    test_all = np.concatenate([np.asarray(fx_test_t), np.asarray(fx_test_inf)[None]])

    result = DemoResult(
        steps=[*steps.tolist(), float("inf")],
        train_loss=[_mse(p, y_train) for p in train_all],
        test_loss=[_mse(p, y_test) for p in test_all],
        test_accuracy=[float(np.mean(p.argmax(-1) == test_labels)) for p in test_all],
    )
    print(f"gradient descent on MSE, learning rate {lr:.4g} (half the largest stable one)")
    print(f"{'steps':>8} {'train loss':>11} {'test loss':>10} {'test acc':>9}")
    for s, tr, te, acc in zip(
        result.steps, result.train_loss, result.test_loss, result.test_accuracy, strict=True
    ):
        print(f"{s:>8.0e} {tr:>11.5f} {te:>10.5f} {acc:>9.3f}")
    if plot:
        path = _plot(result, Path(out_dir))
        print(f"plot saved to {path}")
    return result


def _mse(prediction: np.ndarray, target: np.ndarray) -> float:
    return float(0.5 * jnp.mean((jnp.asarray(prediction) - target) ** 2))


def _plot(result: DemoResult, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    finite = [s for s in result.steps if np.isfinite(s)]
    shown = [max(s, 1.0) for s in finite]
    x_inf = shown[-1] * 10
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, values in (("train", result.train_loss), ("test", result.test_loss)):
        ax_loss.plot(shown, values[: len(finite)], "o-", label=f"{name} loss")
        ax_loss.plot([x_inf], [values[-1]], "*", markersize=12, color=ax_loss.lines[-1].get_color())
    ax_acc.plot(shown, result.test_accuracy[: len(finite)], "o-", label="test accuracy")
    ax_acc.plot([x_inf], [result.test_accuracy[-1]], "*", markersize=12, label="t = infinity")
    for ax in (ax_loss, ax_acc):
        ax.set_xscale("log")
        ax.set_xlabel("gradient descent steps (star: infinite time)")
        ax.legend()
    ax_loss.set_yscale("log")
    ax_loss.set_title("MSE loss predicted by the empirical NTK")
    ax_acc.set_title("Test accuracy on held-out digits")
    fig.tight_layout()
    path = out_dir / "ntk_demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
