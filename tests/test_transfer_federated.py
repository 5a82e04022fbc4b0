"""Transfer unlearning by data selection as federated rounds: the transfer experiment
(`server.experiments.transfer`) and its client handlers (`client.transfer`).

Runs use the offline `digits` dataset (classes 0-4 source, 5-9 target), a small MLP and 3 in-process clients
running the real ClientApp: 1 pretraining round, then 1 transfer round. The data path is instrumented: every call of
`train_local` records the arrays it trains on, and they must be exactly the examples `training_examples` names.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

import client.handlers
import client.transfer
from client.transfer import (
    PRETRAIN,
    SELECT_MESSAGE,
    SelectionMissing,
    auxiliary_pool,
    own_examples,
    static_mask,
    target_examples,
    training_examples,
)
from fedsparse.config import ConfigError, resolve
from server.local_grid import LocalGrid

pytestmark = pytest.mark.usefixtures("one_torch_thread", "task_identity")

RUN = {"experiment": "transfer", "dataset": "digits", "model": "mlp", "num-clients": 3, "partitioner": "iid",
       "local-epochs": 1, "batch-size": 16, "lr": 0.05, "momentum": 0.5, "seed": 4, "num-rounds": 2,
       "train-subset": 900}


def _cfg(out, method: str, **transfer: object) -> dict:
    keys = {"method": method, "pretrain-rounds": 1, "rounds": 1, "aux-size": 200, "neighbours": 2, **transfer}
    return resolve({**RUN, "output-dir": str(out), "transfer": keys})


def _run(cfg: dict, monkeypatch) -> tuple[dict, LocalGrid, list[tuple[int, str, np.ndarray, np.ndarray]]]:
    """Run the experiment; record (partition, stage, ids, x) of every training set and check that train_local
    trained on exactly those arrays."""
    from server.loop import run_federation

    trained: list[tuple[int, str, np.ndarray, np.ndarray]] = []
    seen_by_train_local: list[np.ndarray] = []
    original_examples, original_train = client.transfer.training_examples, client.handlers.train_local

    def recording_examples(cfg_, partition_id, stage, state):
        examples = original_examples(cfg_, partition_id, stage, state)
        trained.append((partition_id, stage, examples.ids.copy(), examples.x.copy()))
        return examples

    def recording_train(net, x, y, *args, **kwargs):
        seen_by_train_local.append(np.array(x, copy=True))
        return original_train(net, x, y, *args, **kwargs)

    monkeypatch.setattr(client.transfer, "training_examples", recording_examples)
    monkeypatch.setattr(client.handlers, "train_local", recording_train)
    grid = LocalGrid(cfg, cfg["num-clients"])
    summary = run_federation(grid, cfg)
    assert len(seen_by_train_local) == len(trained)
    for (_, _, _, x), used in zip(trained, seen_by_train_local, strict=True):
        np.testing.assert_array_equal(used, x)  # the data path: nothing but training_examples reaches a gradient
    return summary, grid, trained


def test_no_non_static_example_ever_reaches_a_gradient(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "data_selection")
    summary, grid, trained = _run(cfg, monkeypatch)
    pool_ids = set(auxiliary_pool(cfg).ids.tolist())
    selected = 0
    for partition in range(cfg["num-clients"]):
        target = target_examples(cfg, partition)
        static = static_mask(cfg, partition, len(target))
        non_static_ids, static_ids = set(target.ids[~static].tolist()), set(target.ids[static].tolist())
        assert non_static_ids and static_ids
        stages = [(stage, set(ids.tolist())) for p, stage, ids, _ in trained if p == partition]
        assert [stage for stage, _ in stages] == [PRETRAIN, "data_selection"]
        source_ids = set(own_examples(cfg, partition).ids[own_examples(cfg, partition).y < 5].tolist())
        assert stages[0][1] == source_ids
        ids = stages[1][1]
        assert not ids & non_static_ids  # the withdrawal-relevant property
        assert static_ids <= ids <= static_ids | pool_ids
        selected += len(non_static_ids) * cfg["transfer.neighbours"]
    assert summary["selection"]["selected"] == selected
    assert summary["selection"]["clients"] == cfg["num-clients"]
    assert summary["selection_bytes"]["down"] > 0 and summary["selection_bytes"]["up"] > 0
    assert [t for t, _ in grid.delivered].count(SELECT_MESSAGE) == cfg["num-clients"]
    assert 0.0 <= summary["target_accuracy"] <= 1.0 and "pretrained_source_accuracy" in summary


@pytest.mark.parametrize("method", ["static_only", "all_data"])
def test_baselines_train_on_the_static_or_all_target_examples(tmp_path, monkeypatch, method):
    cfg = _cfg(tmp_path, method)
    summary, grid, trained = _run(cfg, monkeypatch)
    assert SELECT_MESSAGE not in [t for t, _ in grid.delivered]
    assert summary["selection_bytes"] == {"down": 0, "up": 0}
    for partition, stage, ids, _ in trained:
        if stage == PRETRAIN:
            continue
        target = target_examples(cfg, partition)
        wanted = target.ids[static_mask(cfg, partition, len(target))] if method == "static_only" else target.ids
        assert sorted(ids.tolist()) == sorted(wanted.tolist())


def test_the_transfer_phase_starts_from_a_fresh_seeded_head(tmp_path):
    """on_start replaces exactly the classifier head's tensors by the seeded fresh head's; every other tensor
    keeps its pretrained value."""
    from flwr.app import ArrayRecord

    from fedsparse.unlearning.transfer import classifier_head
    from server.experiments import PhaseContext
    from server.experiments.transfer import TransferExperiment

    experiment = TransferExperiment(_cfg(tmp_path, "static_only"))
    fresh = experiment.fresh_head_model.state_dict()
    pretrained = {k: v + 1.0 for k, v in experiment.model.state_dict().items()}
    ctx = PhaseContext(grid=None, cfg=experiment.cfg, model=experiment.model, arrays=ArrayRecord(pretrained),
                       nodes={}, phase_index=1, out_dir=tmp_path, phase=experiment.phases[1])
    experiment.on_start(ctx)
    started = ctx.arrays.to_torch_state_dict()
    head_name, _ = classifier_head(experiment.model)
    head_keys = {f"{head_name}.weight", f"{head_name}.bias"}
    assert head_keys <= set(started)
    for key, value in started.items():
        expected = fresh[key] if key in head_keys else pretrained[key]
        assert bool((value == expected).all()), key


def test_a_data_selection_round_without_a_selection_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "data_selection")
    with pytest.raises(SelectionMissing):
        training_examples(cfg, 0, "data_selection", RecordDict())
    with pytest.raises(ValueError, match="unknown transfer stage"):
        training_examples(cfg, 0, "everything", RecordDict())


@pytest.mark.parametrize(("settings", "key"), [
    ({"train-subset": 0}, "train-subset"),
    ({"num-rounds": 3}, "num-rounds"),
    ({"transfer": {"source-classes": 10, "pretrain-rounds": 1, "rounds": 1}}, "transfer.source-classes"),
    ({"transfer": {"aux-size": 5000, "pretrain-rounds": 1, "rounds": 1}}, "transfer.aux-size"),
    ({"strategy": "ssfl"}, "strategy"),
])
def test_config_errors_name_the_key(tmp_path, settings, key):
    from server.experiments.transfer import TransferExperiment

    base = {**RUN, "output-dir": str(tmp_path), "transfer": {"pretrain-rounds": 1, "rounds": 1, "aux-size": 200}}
    with pytest.raises(ConfigError, match=f"'{key}'"):
        TransferExperiment.check_config(resolve({**base, **settings}))
