"""The main job in miniature: NTK of a small CNN on real digits, then predictions.

Uses scikit-learn's bundled 8x8 digits (1 797 real handwritten images, no
download). Computes the empirical NTK of a two-layer CNN on a few hundred
training images into kernel stores (which a second run reuses without
computing), predicts the network's outputs under gradient descent on MSE at
many training times and at infinity, prints test accuracy and loss per time,
and saves a plot.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ntk_dist import models, predict
from ntk_dist.empirical import NtkImplementation, empirical_ntk_fn
from ntk_dist.jobs import run_kernel_job


@dataclass(frozen=True)
class DemoResult:
    """Per-time metrics of the predicted training run (time in gradient steps).

    ``tiles_computed`` counts kernel tiles computed by this run (0 when the
    stores of an earlier run were reused).
    """

    steps: list[float]
    train_loss: list[float]
    test_loss: list[float]
    test_accuracy: list[float]
    tiles_computed: int


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
    block_size: int = 150,
) -> DemoResult:
    """Run the demo end to end and return the metrics it printed.

    The kernels go through stores under ``out_dir/kernels``, in tiles of
    ``block_size`` examples a side; a second run with the same arguments reuses
    them and computes no tile (``DemoResult.tiles_computed``).
    """
    x_train, y_train, x_test, y_test, test_labels = load_digits(n_train, n_test, seed)
    f, params = models.digits_cnn(seed)
    k_train_train, k_test_train, tiles_computed = _kernels(
        f, params, x_train, x_test, Path(out_dir) / "kernels", seed, block_size
    )

    lr = 0.5 * float(predict.max_learning_rate(k_train_train, y_train_size=y_train.size))
    predict_fn = predict.gradient_descent_mse(
        k_train_train, y_train, learning_rate=lr, diag_reg=1e-4
    )
    fx_train_0 = np.asarray(f(params, x_train))
    fx_test_0 = np.asarray(f(params, x_test))

    steps = np.concatenate([[0.0], np.logspace(0, 5, 11)])
    fx_train_t, fx_test_t = predict_fn(steps, fx_train_0, fx_test_0, k_test_train)
    fx_train_inf, fx_test_inf = predict_fn(None, fx_train_0, fx_test_0, k_test_train)
    train_all = np.concatenate([np.asarray(fx_train_t), np.asarray(fx_train_inf)[None]])
    test_all = np.concatenate([np.asarray(fx_test_t), np.asarray(fx_test_inf)[None]])

    result = DemoResult(
        steps=[*steps.tolist(), float("inf")],
        train_loss=[_mse(p, y_train) for p in train_all],
        test_loss=[_mse(p, y_test) for p in test_all],
        test_accuracy=[float(np.mean(p.argmax(-1) == test_labels)) for p in test_all],
        tiles_computed=tiles_computed,
    )
    print(f"gradient descent on MSE, learning rate {lr:.4g} (half the largest stable one)")
    print(f"{'steps':>8} {'train loss':>11} {'test loss':>10} {'test acc':>9}")
    for s, tr, te, acc in zip(
        result.steps, result.train_loss, result.test_loss, result.test_accuracy, strict=True
    ):
        print(f"{s:>8.3g} {tr:>11.3e} {te:>10.5f} {acc:>9.3f}")
    if plot:
        path = _plot(result, Path(out_dir))
        print(f"plot saved to {path}")
    return result


def _kernels(
    f: Callable,
    params: Any,
    x_train: np.ndarray,
    x_test: np.ndarray,
    folder: Path,
    seed: int,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Train-train and test-train NTKs through stores in ``folder``; tiles computed now.

    A store holding these very kernels (same inputs, params and spec) is reused;
    one holding others (other sizes or seed) is replaced.
    """
    ntk_fn = empirical_ntk_fn(
        f, trace_axes=(-1,), vmap_axes=0, implementation=NtkImplementation.AUTO
    )
    computed = 0
    kernels = []
    for name, x1, x2 in (("train_train", x_train, None), ("test_train", x_test, x_train)):
        job = run_kernel_job(
            ntk_fn,
            x1,
            x2,
            params,
            folder / f"{name}.zarr",
            progress=False,
            block_size=block_size,
            overwrite=True,
            model_name=f"ntk_dist.models:digits_cnn(seed={seed})",
        )
        verb = "reused" if job.tiles_computed == 0 else "computed"
        print(
            f"{verb} store {job.store.path} ({job.tiles_computed} of {job.tiles_total} tiles "
            f"computed, {job.store.shape[0]} x {job.store.shape[1]} NTK, {job.seconds:.1f} s)"
        )
        computed += job.tiles_computed
        kernels.append(job.store.to_numpy())
    return kernels[0], kernels[1], computed


def _mse(prediction: np.ndarray, target: np.ndarray) -> float:
    return float(0.5 * jnp.mean((jnp.asarray(prediction) - target) ** 2))


def _plot(result: DemoResult, out_dir: Path) -> Path:
    """Loss and accuracy against steps on a log axis, with t = 0 and t = infinity marked.

    Step 0 sits one decade left of step 1 and infinity one decade right of the last
    step, both labelled on the axis. A loss below the plotted range (the train loss
    at infinity is ~0) is drawn at the bottom edge and its value written next to it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    finite = np.array([s for s in result.steps if np.isfinite(s)])
    positive = finite[finite > 0]
    x_zero, x_inf = positive.min() / 10, positive.max() * 10
    x = np.where(finite > 0, finite, x_zero)
    ticks = [x_zero, *10.0 ** np.arange(np.log10(positive.min()), np.log10(x_inf)), x_inf]
    labels = ["0", *(f"$10^{{{int(round(np.log10(t)))}}}$" for t in ticks[1:-1]), "∞"]

    losses = np.array([result.train_loss[:-1], result.test_loss[:-1]])
    floor = losses[losses > 0].min() / 3
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, values in (("train", result.train_loss), ("test", result.test_loss)):
        (line,) = ax_loss.plot(x, values[:-1], "o-", markersize=4, label=f"{name} loss")
        at_inf = values[-1]
        ax_loss.plot([x_inf], [max(at_inf, floor)], "*", markersize=14, color=line.get_color())
        if at_inf < floor:
            ax_loss.annotate(
                f"{name} loss at t = ∞: {at_inf:.1e}\n(star drawn at the axis floor)",
                (x_inf, floor),
                xytext=(0.3, 0.06),
                textcoords="axes fraction",
                color=line.get_color(),
                arrowprops={"arrowstyle": "->", "color": line.get_color()},
            )
    ax_loss.set_yscale("log")
    ax_loss.set_ylim(bottom=floor / 1.5)
    ax_loss.set_title("MSE loss predicted by the empirical NTK")

    (line,) = ax_acc.plot(x, result.test_accuracy[:-1], "o-", markersize=4, label="test accuracy")
    ax_acc.plot([x_inf], [result.test_accuracy[-1]], "*", markersize=14, color=line.get_color())
    ax_acc.annotate(
        f"{result.test_accuracy[-1]:.3f}",
        (x_inf, result.test_accuracy[-1]),
        xytext=(-8, -14),
        textcoords="offset points",
        ha="right",
    )
    ax_acc.set_ylim(0, 1)
    ax_acc.set_title("Test accuracy on held-out digits")

    for ax in (ax_loss, ax_acc):
        ax.set_xscale("log")
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        ax.axvspan(positive.max() * 10**0.5, x_inf * 10**0.5, color="0.92", zorder=0)
        ax.set_xlim(x_zero / 10**0.5, x_inf * 10**0.5)
        ax.set_xlabel("gradient descent steps (star: t = ∞, closed form)")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left")
    fig.tight_layout()
    path = out_dir / "ntk_demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
