"""`eval-every`: the runner evaluates every k-th round of a phase and always its last round; skipping evaluations
never changes the training, and every reader of rounds.csv copes with the rounds that carry no test metrics.

Runs are the real runner with the real ClientApp in process (`server.local_grid.LocalGrid`) on `digits`, 3 clients.
"""

from __future__ import annotations

import math

import pytest
import torch

from client.handlers import HANDLERS
from fedsparse.config import ConfigError, resolve
from fedsparse.results import read_rounds, report
from server.local_grid import LocalGrid
from server.loop import TrainingFailed, is_evaluated, run_federation

BASE = {"dataset": "digits", "model": "mlp", "num-clients": 3, "local-epochs": 1, "batch-size": 32,
        "partitioner": "iid", "strategy": "ssfl", "sparse.sparsity": 0.5, "lr": 0.05, "fraction-train": 0.67}

pytestmark = pytest.mark.usefixtures("one_torch_thread", "task_identity")


def run(folder, **overrides) -> dict:
    """One in-process run into `folder`; its summary."""
    cfg = resolve({**BASE, "output-dir": str(folder), **overrides})
    return run_federation(LocalGrid(cfg), cfg)


def test_is_evaluated_every_kth_round_and_the_phase_last():
    assert [r for r in range(1, 8) if is_evaluated(r, 7, 3)] == [3, 6, 7]
    assert [r for r in range(1, 7) if is_evaluated(r, 6, 3)] == [3, 6]
    assert [r for r in range(1, 4) if is_evaluated(r, 3, 1)] == [1, 2, 3]
    assert [r for r in range(1, 3) if is_evaluated(r, 2, 5)] == [2]
    with pytest.raises(ValueError, match="eval-every must be >= 1"):
        is_evaluated(1, 3, 0)


@pytest.mark.parametrize("value", [0, -2])
def test_config_refuses_eval_every_below_one_by_name(value):
    with pytest.raises(ConfigError, match=r"config key 'eval-every': .* must be >= 1"):
        resolve({"eval-every": value})
    assert resolve({})["eval-every"] == 1


def test_eval_every_3_over_7_rounds_evaluates_3_6_7_and_trains_the_same_model(tmp_path, capsys):
    every = run(tmp_path / "every", **{"num-rounds": 7})
    sparse = run(tmp_path / "sparse", **{"num-rounds": 7, "eval-every": 3})
    dense_rows = read_rounds(tmp_path / "every" / "rounds.csv")
    rows = read_rounds(tmp_path / "sparse" / "rounds.csv")

    evaluated = [int(r["round"]) for r in rows if math.isfinite(r["test_accuracy"])]
    assert evaluated == [3, 6, 7]
    for row in rows:  # a round not evaluated has every test metric empty, not a stale or zero value
        metrics = ("test_accuracy", "test_loss", "acc/digits", "loss/digits")
        assert all(math.isfinite(row[k]) == (int(row["round"]) in (3, 6, 7)) for k in metrics)
    csv_lines = (tmp_path / "sparse" / "rounds.csv").read_text().splitlines()
    assert csv_lines[1].split(",")[1:3] == ["", ""]  # round 1: test_loss, test_accuracy empty cells

    # the training is untouched: same train losses, bytes, and final model bit for bit
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in dense_rows]
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in dense_rows]
    for index in (2, 5, 6):
        assert rows[index]["test_accuracy"] == dense_rows[index]["test_accuracy"]
    a = torch.load(tmp_path / "every" / "final_model.pt")
    b = torch.load(tmp_path / "sparse" / "final_model.pt")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)

    # summary: final = round 7's accuracy, best over the evaluated rounds only
    assert sparse["final_accuracy"] == rows[6]["test_accuracy"] == every["final_accuracy"]
    assert sparse["best_accuracy"] == max(rows[i]["test_accuracy"] for i in (2, 5, 6))
    assert sparse["phases"][0]["final"]["test_accuracy"] == sparse["final_accuracy"]
    assert sparse["best_accuracy"] <= every["best_accuracy"]

    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[fedsparse] round")]
    assert [("acc -" in line) for line in progress[-7:]] == [True, True, False, True, True, False, False]

    # the report and its plot read the file with its empty cells
    table = report([tmp_path / "sparse"], tmp_path / "report.png")
    assert f"{100 * sparse['final_accuracy']:.2f}" in table and (tmp_path / "report.png").stat().st_size > 0


def test_a_non_finite_train_loss_stops_the_run_on_a_round_not_evaluated(tmp_path, monkeypatch):
    """Each reply's loss is finite (1e308), their example-weighted sum is not: the aggregate train loss is inf."""
    original = HANDLERS["train"]

    def overflowing(content, state, cfg, partition_id):
        reply = original(content, state, cfg, partition_id)
        reply["metrics"]["train-loss"] = 1e308
        return reply

    monkeypatch.setitem(HANDLERS, "train", overflowing)
    with pytest.raises(TrainingFailed, match="round 1: the clients' aggregated train loss is inf"):
        run(tmp_path / "out", **{"num-rounds": 4, "eval-every": 4})
    assert not (tmp_path / "out" / "summary.json").exists()
