"""Model merging as federated rounds: the merge experiment (`server.experiments.merging`) with its clients
(`client.merging`), through the real runner and ClientApp on the offline `split-digits` stream with a small MLP.

The merge methods themselves are checked by hand in tests/test_merging.py; here: the federated path gives back the
experts exactly (TA of one expert with lambda 1 is that expert), bytes are counted, the summary reports the
normalized accuracy, TACT gives the merged model each expert's statistics, with per-task heads task i is scored with
expert i's exact head, a run killed mid-way and resumed ends bit-identical, and the config refuses what the
experiment cannot run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsparse.config import ConfigError, resolve
from fedsparse.tasks import stream_task_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = {"experiment": "merge", "dataset": "digits", "model": "mlp", "partitioner": "iid", "batch-size": 16,
       "lr": 0.05, "momentum": 0.5, "seed": 3}


def _cfg(out, clients: int, rounds: int = 1, **merge: object) -> dict:
    keys = {"stream": "split-digits", "train-size": 0, "test-size": 0, "expert-rounds": rounds,
            "expert-epochs": 2, **merge}
    return resolve({**RUN, "output-dir": str(out), "num-clients": clients, "num-rounds": rounds, "merge": keys})


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    return set(first) == set(second) and all(torch.allclose(first[k], second[k], rtol=0, atol=atol) for k in first)


def _expert_by_hand(cfg: dict, partition_id: int, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What client `partition_id` trains in round 1, computed by calling its handler directly."""
    from client.handlers import model_and_layout
    from client.merging import EXPERT, train_expert
    from fedsparse import sparse, transport

    _, layout = model_and_layout(cfg)  # the payload order the client reads
    values, dense = sparse.gather(start, layout, None)
    content = RecordDict({"arrays": transport.make_payload(values, dense, "float32"),
                          "config": ConfigRecord({"server-round": 1, "lr": cfg["lr"], "value-dtype": "float32",
                                                  "mask-fingerprint": sparse.NO_MASK,
                                                  "expert-epochs": cfg["merge.expert-epochs"]})})
    state = RecordDict()
    train_expert(content, state, cfg, partition_id)
    return state[EXPERT].to_torch_state_dict()


@pytest.mark.parametrize("local", [True, False])
def test_task_arithmetic_of_one_expert_with_lambda_one_is_that_expert(tmp_path, task_identity, local):
    from server.loop import run_federation
    from tests.test_continual_federated import AppGrid

    cfg = _cfg(tmp_path / "run", 1, **{"method": "task_arithmetic", "lambda": 1.0, "local": local})
    grid = AppGrid(cfg, 1)
    summary = run_federation(grid, cfg)
    merged = torch.load(tmp_path / "run" / "final_model.pt")
    from server.experiments.merging import MergeExperiment

    experiment = MergeExperiment(cfg)
    start = experiment.initial_state(0)
    expert = _expert_by_hand(cfg, 0, start)
    assert not _same(expert, start, atol=1e-3)  # it trained
    assert _same(merged, expert, atol=1e-6)  # received model + (expert - received model), float32 round-off only
    assert grid.handled.count("train.merge") == 1
    task = stream_task_names("split-digits", {**cfg, "cl.train-size": 0, "cl.test-size": 0})[0]
    assert summary["normalized_accuracy"][task] == pytest.approx(1.0, abs=1e-9)
    assert summary["expert_accuracy"][task] > 0.95  # a 2-class digits task


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_a_merge_of_three_experts_counts_bytes_and_reports_normalized_accuracy(tmp_path, task_identity, seed):
    from fedsparse.results import read_rounds
    from server.loop import run_federation
    from tests.test_continual_federated import AppGrid

    cfg = _cfg(tmp_path / "run", 3, rounds=2, method="ties", **{"expert-epochs": 4}) | {"seed": seed}
    grid = AppGrid(cfg, 3)
    summary = run_federation(grid, cfg)
    rows = read_rounds(tmp_path / "run" / "rounds.csv")
    names = stream_task_names("split-digits", {**cfg, "cl.train-size": 0, "cl.test-size": 0})[:3]
    assert summary["merge_tasks"] == names and len(rows) == 2
    assert grid.handled.count("train.merge") == 6
    model_bytes = sum(v.numel() * 4 for v in torch.load(tmp_path / "run" / "final_model.pt").values())
    for row in rows:  # every client gets the model and sends its expert's update: at least the float32 weights
        assert row["bytes_down"] >= 3 * model_bytes and row["bytes_up"] >= 3 * model_bytes
        assert row["bytes_up"] < 3 * model_bytes * 1.1
    for name in names:
        assert summary["merged_accuracy"][name] == pytest.approx(rows[-1][f"acc/{name}"])
        assert summary["normalized_accuracy"][name] == pytest.approx(
            summary["merged_accuracy"][name] / summary["expert_accuracy"][name])
        assert summary["expert_accuracy"][name] > 0.9
    assert summary["normalized_accuracy_mean"] == pytest.approx(np.mean(list(summary["normalized_accuracy"].values())))


def test_alignment_of_a_permuted_copy_recovers_it_and_the_merge_is_that_model(tmp_path):
    """Two 'experts' that are one network and a randomly permuted copy of it, from one base: after weight
    matching the average of the two is the network itself; without alignment it is not."""
    from fedsparse.alignment import apply_permutation, permutation_spec, random_permutation
    from server.experiments.merging import MergeExperiment

    cfg = _cfg(tmp_path / "run", 2, method="average", local=False, align=True)
    experiment = MergeExperiment(cfg)
    spec = permutation_spec("mlp", experiment.model)
    expert = {k: v + 0.1 * torch.randn_like(v) for k, v in experiment.initial_state(0).items()}
    permutation = random_permutation(spec, torch.Generator().manual_seed(1))
    experiment.initial_state = lambda p: experiment.initial if p == 0 else apply_permutation(
        spec, permutation, experiment.initial)
    twin = apply_permutation(spec, permutation, expert)
    merged = experiment.merge({0: expert, 1: twin})
    assert _same(merged, expert, atol=1e-6)
    experiment.cfg = {**cfg, "merge.align": False}
    assert not _same(experiment.merge({0: expert, 1: twin}), expert, atol=1e-3)


@pytest.mark.parametrize(("settings", "key"), [
    ({"experiment": "standard", "merge": {"method": "ties"}}, "merge.method"),
    ({"num-rounds": 2}, "'num-rounds'"),
    ({"strategy": "ssfl"}, "'strategy'"),
    ({"num-clients": 9}, "'num-clients'"),
    ({"dataset": "fashion-mnist"}, "'dataset'"),
])
def test_the_config_refuses_what_a_merge_run_cannot_do(tmp_path, settings, key):
    from server.experiments.merging import MergeExperiment

    merge = {"stream": "split-digits", "train-size": 0, "test-size": 0, **settings.pop("merge", {})}
    with pytest.raises(ConfigError, match=key):
        cfg = resolve({**RUN, "output-dir": str(tmp_path), "num-clients": 3, "num-rounds": 1, "merge": merge,
                       **settings})
        MergeExperiment.check_config(cfg)


def test_the_info_handler_reports_the_task_size_in_a_merge_run_only():
    from client.handlers import HANDLERS
    from client.merging import merge_tasks

    cfg = resolve({**RUN, "num-clients": 3, "num-rounds": 1, "merge": {"stream": "split-digits", "train-size": 0,
                                                                       "test-size": 0}})
    reply = HANDLERS["query.info"](RecordDict(), RecordDict(), cfg, 2)
    assert reply["metrics"]["num-examples"] == len(merge_tasks(cfg)[2].y_train)
    plain = resolve({**RUN, "experiment": "standard", "num-clients": 3})
    from client.handlers import local_data

    assert HANDLERS["query.info"](RecordDict(), RecordDict(), plain, 2)["metrics"]["num-examples"] == len(
        local_data(plain, 2)[0])


@pytest.mark.parametrize("align", [False, True])
def test_tact_corrections_from_the_clients_give_the_merged_model_each_experts_statistics(tmp_path, task_identity,
                                                                                          monkeypatch, align):
    """Non-local experts of two tasks, merged, TACT on: with task t's corrections active, the merged model's
    per-channel mean and std on client t's calibration examples equal its expert's (1e-4); the corrections are
    one-off traffic, and the summary's merged accuracy is the corrected model's. With alignment, the expert's
    statistics are those of the aligned (permuted) expert, in the merged model's channel order."""
    from client.merging import EXPERT, calibration_batches, merge_tasks
    from fedsparse.merging.statistics import AffineHooks, record_channel_stats
    from fedsparse.models import build_model
    from fedsparse.train import evaluate
    from server.experiments import EXPERIMENTS
    from server.experiments.merging import MergeExperiment
    from server.loop import run_federation
    from tests.test_continual_federated import AppGrid

    built = []

    def keep(cfg: dict) -> MergeExperiment:
        built.append(MergeExperiment(cfg))
        return built[-1]

    keep.config_namespaces = MergeExperiment.config_namespaces
    keep.check_config = MergeExperiment.check_config
    monkeypatch.setitem(EXPERIMENTS, "merge", keep)
    cfg = _cfg(tmp_path / "run", 2, method="average", local=False, tact=True, align=align, **{"tact-examples": 100})
    grid = AppGrid(cfg, 2)
    summary = run_federation(grid, cfg)
    assert grid.handled.count("query.merge_tact") == 2 and summary["bytes_oneoff"] > 0
    experiment = built[0]
    assert (1 in experiment.permutations) == align
    merged = build_model("mlp", (1, 16, 16), 10)
    merged.load_state_dict(torch.load(tmp_path / "run" / "final_model.pt"))
    for partition, task in enumerate(merge_tasks(cfg)):
        batches = calibration_batches(task.x_train, 100)
        expert = build_model("mlp", (1, 16, 16), 10)
        expert_state = grid.contexts[100 + partition].state[EXPERT].to_torch_state_dict()
        if partition in experiment.permutations:
            from fedsparse.alignment import apply_permutation, permutation_spec

            permutation = experiment.permutations[partition]
            expert_state = apply_permutation(permutation_spec("mlp", expert), permutation, expert_state)
        expert.load_state_dict(expert_state)
        target = record_channel_stats(expert, experiment.layers, batches)
        hooks = AffineHooks(merged, experiment.layers)
        hooks.set(experiment.corrections[task.name])
        try:
            corrected = record_channel_stats(merged, experiment.layers, batches)
            assert summary["merged_accuracy"][task.name] == evaluate(merged, task.x_test, task.y_test)[1]
        finally:
            hooks.remove()
        for layer in experiment.layers:
            torch.testing.assert_close(corrected[layer].mean, target[layer].mean, rtol=0, atol=1e-4)
            torch.testing.assert_close(corrected[layer].std, target[layer].std, rtol=0, atol=1e-4)
        uncorrected = record_channel_stats(merged, experiment.layers, batches)
        assert not torch.allclose(uncorrected[experiment.layers[-1]].std, target[experiment.layers[-1]].std,
                                  atol=1e-2)  # the correction did something


@pytest.mark.parametrize("preset", ["merge-local", "merge-nonlocal"])
def test_presets_resolve_and_pass_the_experiment_check(preset):
    import tomllib

    from server.experiments.merging import MergeExperiment
    from tests.conftest import REPO, SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.skip("needs ../shared/data")
    cfg = resolve(tomllib.loads((REPO / "simulations" / "presets" / f"{preset}.toml").read_text()))
    assert cfg["experiment"] == "merge" and cfg["merge.local"] == (preset == "merge-local")
    assert [task.name for task in MergeExperiment.check_config(cfg)] == [
        "domains:mnist", "domains:usps", "domains:fashion-mnist", "domains:cifar10"]


def _recording_experiments(monkeypatch, spy_on_heads: bool = False) -> list:
    """Make the runner's merge experiments land in the returned list; with `spy_on_heads` every task evaluator is
    wrapped in a `_HeadSpy`."""
    from server.experiments import EXPERIMENTS
    from server.experiments.merging import MergeExperiment

    built: list[MergeExperiment] = []

    def keep(cfg: dict) -> MergeExperiment:
        built.append(MergeExperiment(cfg))
        if spy_on_heads:
            for evaluator in built[-1].phases[0].evaluators:
                evaluator.evaluator = _HeadSpy(evaluator.evaluator, built[-1].head)
        return built[-1]

    keep.config_namespaces = MergeExperiment.config_namespaces
    keep.check_config = MergeExperiment.check_config
    monkeypatch.setitem(EXPERIMENTS, "merge", keep)
    return built


class _HeadSpy:
    """Wraps a task's evaluator: records the model's head entries each time the task scores a model."""

    def __init__(self, evaluator, head: str) -> None:
        self.evaluator, self.head, self.seen = evaluator, head, []

    @property
    def task(self):
        return self.evaluator.task

    def __call__(self, model):
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()
                          if k.startswith(self.head + ".")})
        return self.evaluator(model)


@pytest.mark.parametrize(("local", "align", "tact"), [(True, False, False), (False, True, True)])
def test_with_task_heads_task_i_is_scored_with_expert_is_own_head(tmp_path, task_identity, monkeypatch, local, align,
                                                                  tact):
    """merge.task-heads: the merge leaves the head out (the merged model keeps the base's head), the evaluator of
    task i sees exactly expert i's head tensors (the aligned expert's with merge.align) and puts the shared head
    back afterwards; the summary's merged accuracy is the merged model with that head (and the task's TACT
    corrections)."""
    from client.merging import EXPERT, merge_tasks
    from fedsparse.alignment import apply_permutation, permutation_spec
    from fedsparse.merging import weighted_average
    from fedsparse.merging.statistics import AffineHooks
    from fedsparse.models import build_model
    from fedsparse.train import evaluate
    from server.loop import run_federation
    from tests.test_continual_federated import AppGrid

    built = _recording_experiments(monkeypatch, spy_on_heads=True)
    cfg = _cfg(tmp_path / "run", 2, method="ties", local=local, align=align, tact=tact,
               **{"task-heads": True, "tact-examples": 100})
    grid = AppGrid(cfg, 2)
    summary = run_federation(grid, cfg)
    experiment = built[0]
    head = experiment.head
    assert summary["merge_task_heads"] is True
    final = torch.load(tmp_path / "run" / "final_model.pt")
    spec = permutation_spec("mlp", experiment.model)
    inits = []
    for partition in range(2):
        init = experiment.initial_state(partition)
        if partition in experiment.permutations:
            init = apply_permutation(spec, experiment.permutations[partition], init)
        inits.append(init)
    base = experiment.initial if local else weighted_average(inits, [0.5, 0.5])
    head_keys = [k for k in final if k.startswith(head + ".")]
    assert len(head_keys) == 2 and head_keys[0].split(".")[0] not in experiment.layers
    for key in head_keys:  # the merge never touched the head: the global model keeps the base's
        assert torch.equal(final[key], base[key])
    merged = build_model("mlp", (1, 16, 16), 10)
    merged.load_state_dict(final)
    for partition, task in enumerate(merge_tasks(cfg)):
        expert = experiment.strategy.experts[partition]
        client_expert = grid.contexts[100 + partition].state[EXPERT].to_torch_state_dict()
        assert _same({k: expert[k] for k in head_keys}, {k: client_expert[k] for k in head_keys}, atol=1e-6)
        if partition in experiment.permutations:
            expert = apply_permutation(spec, experiment.permutations[partition], expert)
        assert (partition in experiment.permutations) == (align and partition > 0)
        own = {k: expert[k] for k in head_keys}
        assert set(experiment.heads[task.name]) == set(head_keys)
        assert all(torch.equal(experiment.heads[task.name][k], own[k]) for k in head_keys)
        seen = experiment.phases[0].evaluators[partition].evaluator.seen
        assert seen and all(torch.equal(seen[-1][k], own[k]) for k in head_keys)
        assert not torch.equal(own[head_keys[0]], final[head_keys[0]])  # expert heads differ from the shared one
        # the summary's accuracy is the merged model with this task's head (and corrections)
        model = build_model("mlp", (1, 16, 16), 10)
        model.load_state_dict({**final, **own})
        hooks = AffineHooks(model, experiment.layers)
        if tact:
            hooks.set(experiment.corrections[task.name])
        assert summary["merged_accuracy"][task.name] == evaluate(model, task.x_test, task.y_test)[1]
        hooks.remove()
        before = {k: v.clone() for k, v in merged.state_dict().items()}
        experiment.phases[0].evaluators[partition](merged)
        assert _same(before, merged.state_dict())  # the shared head is put back


def test_a_merge_run_killed_after_round_one_and_resumed_ends_identical(tmp_path, task_identity):
    """Two expert rounds (non-local, aligned TIES, task heads, TACT): uninterrupted, vs killed after the clients
    answered round 2 and resumed with fresh nodes from the round-1 checkpoint and the clients' snapshots. The final
    model is bit-identical and the summary's merge entries and rows equal; resuming the finished run reports them
    again (the experts' accuracies, corrections and heads come from the checkpoint)."""
    import json
    import shutil

    from server.loop import run_federation
    from tests.test_continual_federated import AppGrid, Stop

    def config(out):
        return _cfg(out, 2, rounds=2, method="ties", local=False, align=True, tact=True,
                    **{"task-heads": True, "tact-examples": 50, "expert-epochs": 1})

    whole_cfg = config(tmp_path / "whole")
    whole = run_federation(AppGrid(whole_cfg, 2), whole_cfg)
    part_cfg = config(tmp_path / "part")
    with pytest.raises(Stop):
        run_federation(AppGrid(part_cfg, 2, stop_after=2), part_cfg)
    assert torch.load(tmp_path / "part" / "checkpoint.pt")["rows"][-1]["round"] == 1
    resumed_cfg = part_cfg | {"resume": True}  # the nodes read it too: they restore their snapshots
    resumed = run_federation(AppGrid(resumed_cfg, 2), resumed_cfg)
    assert _same(torch.load(tmp_path / "whole" / "final_model.pt"), torch.load(tmp_path / "part" / "final_model.pt"))
    keys = ("expert_accuracy", "merged_accuracy", "normalized_accuracy", "normalized_accuracy_mean", "merge_tasks")
    assert {k: whole[k] for k in keys} == {k: resumed[k] for k in keys}
    # one-off bytes: round 2's TACT exchange once (not twice); the resumed server only re-runs client discovery
    assert 0 <= resumed["bytes_oneoff"] - whole["bytes_oneoff"] < 1000 < whole["bytes_oneoff"]
    assert whole["normalized_accuracy_mean"] > 0.3  # the experts trained (mean over the 2 tasks)

    def rows(summary_dir):
        text = (summary_dir / "rounds.csv").read_text().splitlines()
        header = text[0].split(",")
        drop = header.index("seconds")
        return [[v for i, v in enumerate(line.split(",")) if i != drop] for line in text]

    assert rows(tmp_path / "whole") == rows(tmp_path / "part")
    shutil.copytree(tmp_path / "whole", tmp_path / "again")
    again_cfg = config(tmp_path / "again") | {"resume": True}
    again = run_federation(AppGrid(again_cfg, 2), again_cfg)
    assert {k: whole[k] for k in keys} == {k: again[k] for k in keys}
    saved = torch.load(tmp_path / "whole" / "checkpoint.pt")["experiment"]
    assert set(saved["heads"]) == set(whole["merge_tasks"]) and set(saved["corrections"]) == set(whole["merge_tasks"])
    json.dumps(whole)  # the summary stays JSON
