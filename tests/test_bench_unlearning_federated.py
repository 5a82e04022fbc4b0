"""The federated unlearning benchmark's driver (`simulations/bench_unlearning_federated.py`): phase 1 and phase 2 as
two runner calls joined by the checkpoint, one phase 1 shared by the methods, the round offset of the score's N
runs, and the tables. Runs: the offline `digits` dataset, an MLP, 3 in-process clients, 1 + 1 rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from tests.conftest import load_script

REPO = Path(__file__).resolve().parent.parent
RUN = {"experiment": "unlearn", "dataset": "digits", "model": "mlp", "num-clients": 3, "partitioner": "iid",
       "local-epochs": 1, "batch-size": 16, "lr": 0.05, "momentum": 0.5, "seed": 3, "unlearn.client": 0,
       "unlearn.train-rounds": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread", "task_identity")


def _bench():
    return load_script("bench_unlearning_federated")


def _overrides(method: str) -> dict:
    return _bench().method_config(RUN, method, seed=3, rounds=1, oracle_rounds=1)


def _final(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "final_model.pt")


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_phase_two_resumed_from_phase_one_is_the_uninterrupted_run(tmp_path):
    from fedsparse.config import resolve
    from server.loop import run_federation

    bench = _bench()
    overrides = _overrides("del")
    cfg = resolve({**overrides, "output-dir": str(tmp_path / "whole")})
    whole = run_federation(bench.InProcessGrid(cfg), cfg)
    phase_one = bench.run_phase_one(overrides, tmp_path / "p1")
    assert len(torch.load(phase_one / "checkpoint.pt", weights_only=False)["rows"]) == 1  # stopped after phase 1
    split = bench.run_phase_two(overrides, phase_one, tmp_path / "p2")
    assert _same(_final(tmp_path / "whole"), _final(split.folder))
    for key in ("forget_accuracy", "mia_auc", "unlearn_round_bytes", "unlearn_oneoff_bytes", "unlearn_rounds"):
        assert split.summary[key] == whole[key], key
    assert split.summary["unlearn_oneoff_bytes"] > 0  # del's exchanges ran in the resumed call


def test_one_phase_one_serves_every_shared_method(tmp_path):
    bench = _bench()
    saved = {method: torch.load(bench.run_phase_one(_overrides(method), tmp_path / method) / "checkpoint.pt",
                                weights_only=False) for method in ("retrain", "del")}
    first, second = saved["retrain"], saved["del"]
    assert _same(first["state"], second["state"])
    assert first["experiment"] == second["experiment"]
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in first["rows"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in second["rows"]]
    # the relabelled copy resumes as the method's own phase 1 does
    relabelled = bench.relabel_phase_one(tmp_path / "retrain", _overrides("del"), tmp_path / "relabelled")
    via_copy = bench.run_phase_two(_overrides("del"), relabelled, tmp_path / "copy-p2")
    own = bench.run_phase_two(_overrides("del"), tmp_path / "del", tmp_path / "own-p2")
    assert _same(_final(via_copy.folder), _final(own.folder))
    with pytest.raises(ValueError, match="own"):
        bench.relabel_phase_one(tmp_path / "retrain", {**_overrides("del"), "unlearn.method": "other"},
                                tmp_path / "refused")


def test_round_offset_varies_phase_two_only(tmp_path):
    bench = _bench()
    overrides = _overrides("finetune")
    phase_one = bench.run_phase_one(overrides, tmp_path / "p1")
    plain = bench.run_phase_two(overrides, phase_one, tmp_path / "plain")
    again = bench.run_phase_two(overrides, phase_one, tmp_path / "again", round_offset=0)
    shifted = bench.run_phase_two(overrides, phase_one, tmp_path / "shifted", round_offset=bench.ROUND_OFFSET)
    assert _same(_final(plain.folder), _final(again.folder))
    assert not _same(_final(plain.folder), _final(shifted.folder))
    trained = [torch.load(run.folder / "checkpoint.pt", weights_only=False)["experiment"]["trained"]
               for run in (plain, shifted)]
    assert _same(*trained)
    rows = shifted.summary["phases"][-1]
    assert rows["rounds"] == 1 and shifted.summary["unlearn_rounds"] == 1
    # the echo was put back: the server accepted every client's reply
    csv_rows = (shifted.folder / "rounds.csv").read_text().splitlines()
    header = csv_rows[0].split(",")
    assert all(int(line.split(",")[header.index("rejected")]) == 0 for line in csv_rows[1:])


def test_shifted_content_changes_only_the_round_and_leaves_the_original():
    bench = _bench()
    config = ConfigRecord({"server-round": 4, "lr": 0.1})
    content = RecordDict({"config": config})
    shifted = bench.shifted_content(content, 7)
    assert int(shifted["config"]["server-round"]) == 7 and float(shifted["config"]["lr"]) == 0.1
    assert int(content["config"]["server-round"]) == 4


def test_mean_sd_and_score_row_by_hand():
    bench = _bench()
    assert bench.mean_sd([0.1, 0.3], 100) == "20.0 +- 14.1"
    assert bench.mean_sd([0.5], 1, 3) == "0.500 +- -"
    confidences = np.array([[0.0, 1.0], [0.5, 1.5], [1.0, 2.0]])
    same = [bench.ModelScores(c, 0.8, 0.7, 0.1) for c in confidences]
    row, eps = bench.score_row("m", same, same)  # identical distributions: eps 0 everywhere, F = 1, ratios 1
    assert row["score"] == 1.0 and row["forgetting_quality"] == 1.0 and np.all(eps == 0.0)
    assert row["models"] == 3 and row["forget_examples"] == 2
    halved = [bench.ModelScores(c, 0.4, 0.7, 0.1) for c in confidences]
    assert bench.score_row("m", halved, same)[0]["score"] == 0.5  # retain ratio 0.4 / 0.8


def _summary(forget: float) -> dict:
    return {"forget_accuracy": forget, "retain_accuracy": 0.8, "test_accuracy_after": 0.7, "mia_auc": 0.5,
            "fraction_changed": 0.3, "unlearn_rounds": 5, "unlearn_round_bytes": 2_000_000,
            "unlearn_oneoff_bytes": 3_000,
            "before": {"forget_accuracy": 0.9, "retain_accuracy": 0.85, "test_accuracy": 0.8, "mia_auc": 0.55}}


def test_collect_merges_per_seed_tables(tmp_path):
    bench = _bench()
    for seed, forget in ((0, 0.1), (1, 0.3)):
        row = bench.withdrawal_row("del", seed, bench.PhaseTwo(_summary(forget), tmp_path, 12.0))
        bench.write_rows(tmp_path / f"s{seed}" / "withdrawal.csv", [row])
    bench.main(["--collect", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "all")])
    table = (tmp_path / "all" / "withdrawal.md").read_text().splitlines()
    assert table[2].startswith("| trained (before) | 90.0 +- 0.0 | 85.0 +- 0.0 | 80.0 +- 0.0 | 0.550 +- 0.000 |")
    assert table[3] == "| del | 20.0 +- 14.1 | 80.0 +- 0.0 | 70.0 +- 0.0 | 0.500 +- 0.000 | 30.0 +- 0.0 | 5 | 2.0 | 3 " \
                       "| 12 +- 0 |"
    assert len(bench.read_rows(tmp_path / "all" / "withdrawal.csv")) == 2
    assert (tmp_path / "all" / "withdrawal.png").stat().st_size > 0


def test_truncated_oracle_is_the_shorter_oracle(tmp_path):
    from fedsparse.config import resolve
    from server.loop import run_federation

    bench = _bench()
    short = bench.method_config(RUN, "retrain", seed=3, rounds=1, oracle_rounds=1)
    long = bench.method_config(RUN, "retrain", seed=3, rounds=1, oracle_rounds=2)
    phase_one = bench.run_phase_one(short, tmp_path / "p1")
    plain = bench.run_phase_two(short, phase_one, tmp_path / "short")
    cfg = resolve({**long, "output-dir": str(tmp_path / "long")})
    with pytest.raises(bench.RoundLimitReached):
        run_federation(bench.InProcessGrid(cfg, stop_after_round=2), cfg)
    truncated = bench.truncated_oracle(tmp_path / "long", short, tmp_path / "truncated")
    assert _same(_final(plain.folder), _final(truncated.folder))
    for key in ("forget_accuracy", "mia_auc", "fraction_changed", "unlearn_rounds", "unlearn_round_bytes"):
        assert truncated.summary[key] == plain.summary[key], key
    with pytest.raises(ValueError, match="holds"):
        bench.truncated_oracle(tmp_path / "long", long, tmp_path / "refused")
