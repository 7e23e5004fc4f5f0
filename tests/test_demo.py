"""The demo runs end to end on real digits and learns something."""

import numpy as np
import pytest

from ntk_dist import KernelStore
from ntk_dist.cli import main
from ntk_dist.demo import load_digits, run_demo


def test_digits_split_is_disjoint_and_standardised():
    x_train, y_train, x_test, y_test, labels = load_digits(50, 40)
    assert x_train.shape == (50, 8, 8, 1) and x_test.shape == (40, 8, 8, 1)
    assert y_train.shape == (50, 10) and labels.shape == (40,)
    np.testing.assert_allclose(y_test.sum(-1), 0.0, atol=1e-6)  # one-hot minus 0.1
    np.testing.assert_array_equal(y_test.argmax(-1), labels)
    train_rows = {row.tobytes() for row in x_train.reshape(50, -1)}
    assert not any(row.tobytes() in train_rows for row in x_test.reshape(40, -1))


def test_demo_predicts_learning_and_saves_plot(tmp_path, capsys):
    result = run_demo(n_train=120, n_test=120, out_dir=tmp_path, block_size=60)
    # Before training the CNN guesses; after (predicted) training it reads digits.
    assert result.test_accuracy[0] < 0.4
    assert result.test_accuracy[-1] > 0.85
    # Train loss falls monotonically in time and reaches ~0 at infinity.
    assert all(np.diff(result.train_loss) <= 1e-7)
    assert result.train_loss[-1] < 1e-6
    assert result.steps[:3] == [0.0, 1.0, pytest.approx(10**0.5)]
    assert len(result.steps) == 13 and result.steps[-1] == float("inf")
    assert (tmp_path / "ntk_demo.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "test acc" in out and "plot saved" in out
    # 60-example blocks: 3 tiles of the symmetric train-train NTK, 4 of test-train.
    assert result.tiles_computed == 3 + 4
    assert out.count("computed store") == 2

    again = run_demo(n_train=120, n_test=120, out_dir=tmp_path, plot=False, block_size=60)
    assert again.tiles_computed == 0  # both stores reused, nothing recomputed
    out = capsys.readouterr().out
    assert out.count("reused store") == 2 and "(0 of 4 tiles computed" in out
    assert again.test_loss == result.test_loss and again.train_loss == result.train_loss
    assert KernelStore.open(tmp_path / "kernels" / "test_train.zarr").shape == (120, 120)


def test_cli_demo_rejects_too_many_examples():
    with pytest.raises(ValueError, match="exceeds the 1797 digits"):
        main(["demo", "--n-train", "1500", "--n-test", "1500"])
