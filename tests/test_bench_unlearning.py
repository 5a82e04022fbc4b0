"""The centralised unlearning benchmark (`simulations/bench_unlearning.py`) end to end on tiny data: its dataset
switch, the Fashion-MNIST defaults it keeps, per-channel standardisation, and a table with a row per method and forget
set whose sd columns are the sample sd (ddof 1) of the per-run rows. Runs: sklearn's `digits`, the cnn, N = 3."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_script

REPO = Path(__file__).resolve().parent.parent
METHODS = ["del", "finetune", "gradient_ascent", "neggrad_plus", "l1_sparse", "random_label", "salun", "scrub"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bench():
    return load_script("bench_unlearning")


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_defaults_keep_the_fashion_mnist_setup_and_cifar_gets_resnet18_with_normalisation():
    defaults = _bench().parse_args([])
    assert (defaults.dataset, defaults.model, defaults.normalize) == ("fashion-mnist", "cnn", False)
    assert (defaults.train_size, defaults.eval_size, defaults.models, defaults.train_epochs, defaults.train_lr,
            defaults.unlearn_retain, defaults.unlearn_epochs) == (10_000, 1_000, 8, 2, 0.05, 2_500, 1)
    assert defaults.kinds == ["uniform", "class"] and sorted(defaults.methods) == sorted(METHODS)
    cifar = _bench().parse_args(["--dataset", "cifar10"])
    assert (cifar.model, cifar.normalize) == ("resnet18", True)
    assert _bench().parse_args(["--dataset", "cifar10", "--model", "cnn", "--no-normalize"]).normalize is False
    with pytest.raises(ValueError, match="--models must be >= 3"):
        _bench().parse_args(["--models", "2"])


def test_normalised_training_subset_has_zero_mean_unit_sd_and_the_test_draw_uses_its_stats():
    args = _bench().parse_args(["--dataset", "digits", "--train-size", "300", "--eval-size", "100", "--normalize"])
    train, test = _bench().load_data(args)
    raw_args = _bench().parse_args(["--dataset", "digits", "--train-size", "300", "--eval-size", "100"])
    raw_train, raw_test = _bench().load_data(raw_args)
    np.testing.assert_allclose(train.x.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.x.std(), 1.0, atol=1e-4)
    scale = raw_train.x.std(dtype=np.float64)
    np.testing.assert_allclose(test.x, (raw_test.x - raw_train.x.mean(dtype=np.float64)) / scale, atol=1e-4)
    np.testing.assert_array_equal(test.y, raw_test.y)


def test_main_end_to_end_writes_every_method_row_with_sample_sd(tmp_path):
    rows = _bench().main(["--dataset", "digits", "--train-size", "200", "--eval-size", "60", "--models", "3",
                          "--train-epochs", "1", "--unlearn-retain", "60", "--out", str(tmp_path)])
    kinds = ["uniform", "class"]
    assert [(r["kind"], r["method"]) for r in rows] == [(k, m) for k in kinds for m in ["retrain"] + METHODS]
    table = (tmp_path / "table.md").read_text()
    assert "N = 3 models per side" in table and "eps resolved up to 0.69" in table  # ln(N - 1) = ln 2
    body = [line for line in table.splitlines() if line.startswith(tuple(f"| {kind} |" for kind in kinds))]
    assert len(body) == len(rows) and all(line.count("±") == 6 for line in body)
    runs = _read_csv(tmp_path / "runs.csv")
    summary = _read_csv(tmp_path / "results.csv")
    assert len(runs) == 3 * len(rows) and len(summary) == len(rows)
    for row in summary:
        per_run = [r for r in runs if (r["kind"], r["method"]) == (row["kind"], row["method"])]
        assert [int(r["seed"]) for r in per_run] == [0, 1, 2]
        for field in ("forget_acc", "test_acc", "mia_auc", "pct_changed"):
            values = np.array([float(r[field]) for r in per_run])
            np.testing.assert_allclose(float(row[field]), values.mean(), rtol=1e-12)
            np.testing.assert_allclose(float(row[f"{field}_sd"]), values.std(ddof=1), rtol=1e-9, atol=1e-15)
    del_rows = [r for r in rows if r["method"] == "del"]
    assert all(25 < r["pct_changed"] < 35 for r in del_rows)  # DEL changes ~del_alpha = 30% of the parameters
    assert (tmp_path / "scores.png").stat().st_size > 0
