"""Continual learning as federated rounds: task views (`fedsparse.tasks`), the clients' procedure
(`fedsparse.continual.procedure`, `client.continual`) and the server's experiment (`server.experiments.continual`).

Everything runs on the offline `digits` streams with a small MLP; the library-level checks (SFA's formula, the
Fisher by hand, the replay buffer's invariants, the metrics) are in tests/test_continual.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedsparse.config import resolve
from fedsparse.continual.penalties import estimate_fisher
from fedsparse.continual.procedure import (
    ContinualClientState,
    MethodSettings,
    ReplayIndex,
    local_procedure,
)
from fedsparse.continual.replay import ReplayBuffer
from fedsparse.continual.sfa import snapshot
from fedsparse.data import client_split
from fedsparse.models import build_model
from fedsparse.tasks import UnknownTask, client_data, load_task, stream_task_names, task_split
from fedsparse.train import TrainConfig, train_local

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CL_DEFAULTS = {"cl.stream": "split-digits", "cl.method": "finetune", "cl.rounds-per-task": 2, "cl.train-size": 0,
               "cl.test-size": 0}
LOCAL = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.5)


def _cfg(**cl: object) -> dict:
    """A resolved config on digits with 3 clients, the cl.* keys set directly (no experiment check needed here)."""
    cfg = resolve({"dataset": "digits", "num-clients": 3, "partitioner": "iid", "model": "mlp"})
    return {**cfg, **CL_DEFAULTS, **cl}


def _mlp(seed: int = 0) -> torch.nn.Module:
    return build_model("mlp", (1, 16, 16), 10, seed=seed)


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


# -------------------------------------------------------------------------------------------------- tasks


def test_task_names_shapes_and_caps():
    cfg = _cfg()
    names = stream_task_names("split-digits", cfg)
    assert names == ["split-digits:0-1", "split-digits:2-3", "split-digits:4-5", "split-digits:6-7",
                     "split-digits:8-9"]
    task = load_task("split-digits:2-3", cfg)
    assert task.input_shape == (1, 16, 16) and task.classes == (2, 3)
    assert set(np.unique(task.y_train)) == {2, 3} and set(np.unique(task.y_test)) == {2, 3}
    capped = load_task("split-digits:2-3", {**cfg, "cl.train-size": 50, "cl.test-size": 20})
    assert len(capped.y_train) == 50 and len(capped.y_test) == 20
    np.testing.assert_array_equal(capped.x_train, task.x_train[:50])  # a prefix of the uncapped task
    permuted = [load_task(name, cfg) for name in stream_task_names("permuted-digits", cfg)]
    np.testing.assert_array_equal(permuted[0].x_train, load_task("digits", cfg).x_train)  # task 0: identity
    assert not np.array_equal(permuted[1].x_train, permuted[0].x_train)
    np.testing.assert_array_equal(np.sort(permuted[1].x_train.reshape(len(permuted[1].x_train), -1), axis=1),
                                  np.sort(permuted[0].x_train.reshape(len(permuted[0].x_train), -1), axis=1))
    with pytest.raises(UnknownTask, match="no task"):
        load_task("split-digits:9-10", cfg)
    with pytest.raises(UnknownTask, match="unknown stream"):
        load_task("nostream:0", cfg)


def test_task_partitions_are_disjoint_deterministic_and_dataset_views_unchanged():
    cfg = _cfg(**{"cl.stream": "split-digits"})
    name = "split-digits:4-5"
    train_sets, val_sets = zip(*(task_split(name, cfg, client) for client in range(3)), strict=True)
    every = np.concatenate([*train_sets, *val_sets])
    assert len(every) == len(set(every.tolist())) == len(load_task(name, cfg).y_train)  # iid covers every example
    assert all(len(val) == round((len(train) + len(val)) * cfg["val-fraction"])
               for train, val in zip(train_sets, val_sets, strict=True))
    again = task_split(name, cfg, 1)
    np.testing.assert_array_equal(again[0], train_sets[1])
    x, y = client_data(name, cfg, 1)
    np.testing.assert_array_equal(y, load_task(name, cfg).y_train[train_sets[1]])
    assert x.shape == (len(train_sets[1]), 1, 16, 16)
    # a plain dataset name is exactly the single-task split of today
    np.testing.assert_array_equal(task_split("digits", cfg, 2)[0], client_split(cfg, 2)[0])
    dirichlet = {**cfg, "partitioner": "dirichlet", "dirichlet-alpha": 0.3}
    assert not np.array_equal(task_split(name, dirichlet, 0)[0], train_sets[0])


# ------------------------------------------------------------------------------------------------- replay


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_index_bounded_only_past_tasks_and_state_round_trip(seed):
    cfg = _cfg()
    names = stream_task_names("split-digits", cfg)
    labels = {name: client_data(name, cfg, 0)[1] for name in names}
    replay = ReplayIndex(ReplayBuffer(40, seed=seed))
    for index, name in enumerate(names):
        for _ in range(2):  # two rounds on each task: the second message of a task adds nothing
            replay.note_task(name, labels.__getitem__)
            assert len(replay.buffer) <= 40
            assert replay.task_names == names[:index]  # only the tasks before the current one
            assert set(replay.buffer.contents().task_ids.tolist()) <= set(range(index))
        x, y = replay.examples(lambda past: client_data(past, cfg, 0))
        assert len(x) == len(y) == len(replay.buffer)
        assert set(np.unique(y).tolist()) <= {c for past in names[:index] for c in load_task(past, cfg).classes}
        if index == 2:
            arrays, scalars = replay.state()
            restored = ReplayIndex.restore({k: v.copy() for k, v in arrays.items()}, dict(scalars))
    assert len(replay.buffer) == 40
    for name in names[3:]:  # the restored index continues exactly as the original did
        restored.note_task(name, labels.__getitem__)
    np.testing.assert_array_equal(restored.buffer.contents().x, replay.buffer.contents().x)
    np.testing.assert_array_equal(restored.buffer.contents().task_ids, replay.buffer.contents().task_ids)
    with pytest.raises(ValueError, match="came back"):
        replay.note_task(names[0], labels.__getitem__)


# ------------------------------------------------------------------------------------------ local procedure


def _train(model: torch.nn.Module, procedure, seed: int = 3) -> None:
    train_local(model, procedure.x, procedure.y, LOCAL, seed=seed, objective=procedure.objective,
                callbacks=procedure.callbacks)


def test_l2_with_zero_strength_is_finetuning_in_the_client_procedure():
    cfg = _cfg()
    x, y = client_data("split-digits:2-3", cfg, 0)
    anchor = snapshot(_mlp(seed=9))
    state = ContinualClientState(anchor=anchor, anchor_task="split-digits:2-3")
    models = {}
    for method, strength in (("finetune", 0.0), ("l2", 0.0), ("l2", 1e-6), ("l2", 5.0)):
        procedure = local_procedure(MethodSettings(method, penalty=strength, rounds_per_task=2), state,
                                    "split-digits:2-3", x, y, steps_per_round=1, round_in_task=1)
        assert (procedure.objective is None) == (method == "finetune")
        model = _mlp()
        _train(model, procedure)
        models[method, strength] = snapshot(model)
    finetuned = models["finetune", 0.0]
    assert _same(models["l2", 0.0], finetuned)

    def gap(other):
        return max((finetuned[k] - other[k]).abs().max().item() for k in finetuned)

    assert gap(models["l2", 1e-6]) < 1e-5
    assert gap(models["l2", 5.0]) > 1e-3
    # an anchor installed for another task is stale: the client trains as fine-tuning
    stale = local_procedure(MethodSettings("l2", penalty=5.0, rounds_per_task=2), state, "split-digits:4-5", x, y,
                            steps_per_round=1, round_in_task=1)
    assert stale.objective is None and not stale.callbacks


@pytest.mark.parametrize(("p", "expected"), [(1.0, [12]), (0.25, [3, 6, 9, 12]), (0.5, [6, 12])])
def test_client_sfa_counts_steps_over_the_task(p, expected):
    """3 rounds of 4 local steps: T = 12 steps; SFA averages every round(p T) steps of the task and at step 12."""
    cfg = _cfg()
    x, y = client_data("split-digits:2-3", cfg, 0)
    x, y = x[:64], y[:64]  # 4 steps of 16 per epoch
    anchor = snapshot(_mlp(seed=9))
    state = ContinualClientState(anchor=anchor, anchor_task="split-digits:2-3")
    settings = MethodSettings("sfa-client", sfa_p=p, sfa_beta=0.5, rounds_per_task=3)
    local = TrainConfig(epochs=1, batch_size=16, lr=0.05)
    model = _mlp()
    averaged = []
    for round_in_task in (1, 2, 3):
        procedure = local_procedure(settings, state, "split-digits:2-3", x, y, steps_per_round=4,
                                    round_in_task=round_in_task)
        train_local(model, procedure.x, procedure.y, local, seed=round_in_task, callbacks=procedure.callbacks)
        averaged += procedure.sfa.averaged_at
    assert averaged == expected


def test_sfa_client_average_equals_the_formula_after_the_last_step():
    """With p = 1 the last step's weights are (1 - beta) theta + beta anchor, theta the plain SGD result."""
    cfg = _cfg()
    x, y = client_data("split-digits:2-3", cfg, 0)
    anchor = snapshot(_mlp(seed=9))
    state = ContinualClientState(anchor=anchor, anchor_task="split-digits:2-3")
    local = TrainConfig(epochs=1, batch_size=len(y), lr=0.05)  # one step
    plain, averaged = _mlp(), _mlp()
    train_local(plain, x, y, local, seed=1)
    procedure = local_procedure(MethodSettings("sfa-client", sfa_p=1.0, sfa_beta=0.3, rounds_per_task=1), state,
                                "split-digits:2-3", x, y, steps_per_round=1, round_in_task=1)
    train_local(averaged, x, y, local, seed=1, callbacks=procedure.callbacks)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(averaged.state_dict()[key], 0.7 * value + 0.3 * anchor[key], rtol=0, atol=1e-6)


def test_replay_procedure_appends_the_buffer_and_ewc_needs_a_fisher():
    cfg = _cfg()
    x, y = client_data("split-digits:2-3", cfg, 0)
    past = client_data("split-digits:0-1", cfg, 0)
    procedure = local_procedure(MethodSettings("replay", rounds_per_task=1), ContinualClientState(),
                                "split-digits:2-3", x, y, steps_per_round=1, round_in_task=1,
                                replay_data=(past[0][:5], past[1][:5]))
    assert len(procedure.y) == len(y) + 5 and procedure.objective is None
    np.testing.assert_array_equal(procedure.y[len(y):], past[1][:5])
    state = ContinualClientState(anchor=snapshot(_mlp()), anchor_task="split-digits:2-3")
    with pytest.raises(ValueError, match="no Fisher"):
        local_procedure(MethodSettings("ewc", rounds_per_task=1), state, "split-digits:2-3", x, y,
                        steps_per_round=1, round_in_task=1)
    with pytest.raises(ValueError, match="unknown continual method"):
        MethodSettings("nope")


# ------------------------------------------------------------------------------------------ client handlers


def test_client_handlers_keep_the_anchor_and_send_the_fisher():
    from client.continual import fisher, install_anchor, load_client_state

    cfg = _cfg(**{"cl.method": "ewc"})
    model = _mlp(seed=4)
    anchor = ArrayRecord(model.state_dict())
    diagonal = {name: torch.rand(param.shape) for name, param in model.named_parameters()}
    content = RecordDict({"anchor": anchor, "config": ConfigRecord({"task": "split-digits:2-3", "fisher-examples": 77}),
                          "fisher": ArrayRecord({k: Array(v.numpy()) for k, v in diagonal.items()})})
    state = RecordDict()
    reply = install_anchor(content, state, cfg, 1)
    assert reply["config"]["task"] == "split-digits:2-3"
    kept = load_client_state(state)
    assert kept.anchor_task == "split-digits:2-3" and kept.fisher.num_examples == 77
    assert _same(kept.anchor, model.state_dict()) and _same(kept.fisher.diagonal, diagonal)

    request = RecordDict({"model": anchor, "config": ConfigRecord({"task": "split-digits:0-1",
                                                                   "fisher-examples": 30})})
    answer = fisher(request, RecordDict(), cfg, 1)
    x, y = client_data("split-digits:0-1", cfg, 1)
    expected = estimate_fisher(_mlp(seed=4), x, y, max_examples=30)
    assert answer["metrics"]["num-examples"] == 30
    for key, value in expected.diagonal.items():
        torch.testing.assert_close(torch.from_numpy(answer["fisher"][key].numpy()), value, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------ server hooks


class HandlerGrid:
    """Nodes {node id: partition id} answering with our client handlers in-process, each with its own state;
    records every message type it handled."""

    def __init__(self, cfg: dict, nodes: dict[int, int]) -> None:
        self.cfg, self.nodes = cfg, dict(nodes)
        self.states = {node: RecordDict() for node in nodes}
        self.handled: list[str] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Message

        import client.continual  # noqa: F401  (registers the continual handlers, as client.client_app does)
        from client.handlers import HANDLERS

        answers = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.handled.append(message.metadata.message_type)
            content = HANDLERS[message.metadata.message_type](message.content, self.states[node], self.cfg,
                                                             self.nodes[node])
            answers.append(Message(content, reply_to=message))
        return answers


def _experiment(**cl: object):
    from server.experiments.continual import ContinualExperiment

    overrides = {"experiment": "continual", "dataset": "digits", "model": "mlp", "num-clients": 3,
                 "partitioner": "iid", "cl": {"stream": "split-digits", "train-size": 0, "test-size": 0,
                                              **{key.replace("_", "-"): value for key, value in cl.items()}}}
    cfg = resolve(overrides)
    tasks = len(stream_task_names(cfg["cl.stream"], cfg))
    return ContinualExperiment(resolve({**overrides, "num-rounds": tasks * cfg["cl.rounds-per-task"]}))


def _context(experiment, phase_index: int, state: dict[str, torch.Tensor], grid=None):
    from server.experiments import PhaseContext

    return PhaseContext(grid=grid, cfg=experiment.cfg, model=experiment.model, arrays=ArrayRecord(state),
                        nodes={0: 10, 1: 11, 2: 12}, phase_index=phase_index, out_dir=None,
                        phase=experiment.phases[phase_index], timeout=60.0)


def test_experiment_has_one_phase_per_task_and_evaluates_the_tasks_seen():
    experiment = _experiment(method="finetune", rounds_per_task=2)
    assert [phase.task for phase in experiment.phases] == stream_task_names("split-digits", experiment.cfg)
    assert [phase.rounds for phase in experiment.phases] == [2] * 5
    model = experiment.model
    for index, phase in enumerate(experiment.phases):
        metrics = {key: value for evaluator in phase.evaluators for key, value in evaluator(model).items()}
        seen = experiment.phases[index].task, *(p.task for p in experiment.phases[:index])
        assert list(metrics)[::2] == [f"acc/{name}" for name in seen]  # current task first
        assert phase.client_config == {"cl-task-index": index, "cl-first-round": 1 + 2 * index}


@pytest.mark.parametrize(("p", "expected"), [(1.0, {4}), (0.5, {2, 4}), (0.25, {1, 2, 3, 4})])
def test_server_sfa_averages_by_the_formula_on_its_schedule_and_not_in_the_first_task(p, expected):
    experiment = _experiment(method="sfa", rounds_per_task=4, sfa_p=p, sfa_beta=0.3)
    start = {key: value.clone() for key, value in experiment.model.state_dict().items()}
    experiment.on_start(_context(experiment, 0, start))
    for server_round in range(1, 5):  # task 1: never averaged
        moved = {key: value + server_round for key, value in start.items()}
        out = experiment.after_round(_context(experiment, 0, moved), server_round, ArrayRecord(moved))
        assert _same(out.to_torch_state_dict(), moved)
    end_of_task_1 = {key: value + 7.0 for key, value in start.items()}
    experiment.on_start(_context(experiment, 1, end_of_task_1))  # anchor = the previous task's final model
    assert _same(experiment.sfa.anchor, end_of_task_1)
    averaged_rounds = set()
    for round_in_task in range(1, 5):
        current = {key: value * 2.0 - round_in_task for key, value in start.items()}
        out = experiment.after_round(_context(experiment, 1, current), round_in_task,
                                     ArrayRecord(current)).to_torch_state_dict()
        if _same(out, current):
            continue
        averaged_rounds.add(round_in_task)
        for key, value in current.items():
            torch.testing.assert_close(out[key], 0.7 * value + 0.3 * end_of_task_1[key], rtol=0, atol=1e-6)
    assert averaged_rounds == expected


def test_anchor_install_and_ewc_fisher_round_trip_through_the_clients(task_identity):
    experiment = _experiment(method="ewc", rounds_per_task=1, fisher_examples=20)
    grid = HandlerGrid(experiment.cfg, {10: 0, 11: 1, 12: 2})
    first_end = snapshot(experiment.model)
    experiment.on_end(_context(experiment, 0, first_end, grid))  # the clients' Fishers of task 1
    assert grid.handled == ["query.cl_fisher"] * 3
    task = experiment.phases[0].task
    examples = [min(20, len(client_data(task, experiment.cfg, client)[1])) for client in range(3)]
    assert experiment.fisher.num_examples == sum(examples)
    by_hand = [estimate_fisher(_loaded(first_end), *client_data(task, experiment.cfg, client), max_examples=20)
               for client in range(3)]
    for key, value in experiment.fisher.diagonal.items():
        weighted = sum(estimate.diagonal[key] * estimate.num_examples for estimate in by_hand) / sum(examples)
        torch.testing.assert_close(value, weighted, rtol=1e-5, atol=1e-9)
    experiment.on_start(_context(experiment, 1, first_end, grid))  # anchor + Fisher to every client
    assert grid.handled[3:] == ["query.cl_anchor"] * 3
    from client.continual import load_client_state

    for state in grid.states.values():
        kept = load_client_state(state)
        assert kept.anchor_task == experiment.phases[1].task and _same(kept.anchor, first_end)
        assert _same(kept.fisher.diagonal, experiment.fisher.diagonal)
    saved = experiment.state_dict()
    again = _experiment(method="ewc", rounds_per_task=1, fisher_examples=20)
    again.load_state_dict(saved)
    assert _same(again.fisher.diagonal, experiment.fisher.diagonal)


def _loaded(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = _mlp()
    model.load_state_dict(state)
    return model


def test_accuracy_matrix_and_summary_from_rows(tmp_path):
    experiment = _experiment(method="finetune", rounds_per_task=2)
    names = [phase.task for phase in experiment.phases]
    rows = []
    for index, phase in enumerate(experiment.phases):
        for round_in_task in (1, 2):
            row = {"phase": phase.name, "round": 2 * index + round_in_task}
            row.update({f"acc/{name}": 0.1 * round_in_task + 0.01 * index + 0.001 * j
                        for j, name in enumerate(names[:index + 1])})
            rows.append(row)
    extra = experiment.finish(tmp_path, rows)
    matrix = np.array(extra["accuracy_matrix"], dtype=float)
    assert matrix.shape == (5, 5)
    np.testing.assert_allclose(np.diag(matrix), [0.2 + 0.011 * i for i in range(5)])  # each phase's last round
    assert np.isnan(matrix[np.triu_indices(5, 1)]).all()
    assert extra["average_accuracy"] == pytest.approx(np.mean(matrix[-1]))
    assert (tmp_path / "accuracy_matrix.csv").exists() and (tmp_path / "accuracy_matrix.png").exists()
    assert "average_accuracy" not in experiment.finish(tmp_path / "short", rows[:3])  # stopped early: no metrics


# ------------------------------------------------------------------------------ whole runs through the runner


class Stop(Exception):
    """Raised by AppGrid to kill a run after its clients answered a given round."""


class AppGrid:
    """In-process nodes running the real ClientApp (`client.client_app.build_app`: handlers, client-state
    snapshots on disk), each with its own Context; `stop_after` kills the run once the clients answered the train
    messages of that run round (the server never aggregates it)."""

    def __init__(self, cfg: dict, num_nodes: int, stop_after: int | None = None) -> None:
        from flwr.app import Context

        from client.client_app import build_app

        self.app = build_app()
        self.contexts = {100 + p: Context(run_id=1, node_id=100 + p, state=RecordDict(), run_config=cfg,
                                          node_config={"partition-id": p, "num-partitions": num_nodes})
                         for p in range(num_nodes)}
        self.stop_after = stop_after
        self.handled: list[str] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        answers = []
        for message in messages:
            self.handled.append(message.metadata.message_type)
            try:
                answers.append(self.app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as err:  # noqa: BLE001  (as Flower: a client exception is an error reply)
                answers.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message))
        rounds = {int(m.content["config"]["server-round"]) for m in messages
                  if m.metadata.message_type.startswith("train")}
        if self.stop_after is not None and self.stop_after in rounds:
            raise Stop(f"killed after the clients answered round {self.stop_after}")
        return answers


RUN = {"experiment": "continual", "dataset": "digits", "model": "mlp", "num-clients": 3, "partitioner": "iid",
       "local-epochs": 1, "batch-size": 16, "lr": 0.05, "momentum": 0.5, "seed": 3}


def _run_config(out, method: str, rounds: int, **cl: object) -> dict:
    # num-rounds = the two tasks' rounds: fedsparse.resume compares it with the rounds a checkpoint holds
    cl_keys = {"stream": "split-digits", "num-tasks": 2, "method": method, "rounds-per-task": rounds, "train-size": 0,
               "test-size": 0, "replay-size": 30, "fisher-examples": 20, **cl}
    return resolve({**RUN, "output-dir": str(out), "num-rounds": 2 * rounds, "cl": cl_keys})


def _two_tasks(experiment_cls):
    """The continual experiment cut to the stream's first two tasks (a short run that still has a task 2)."""
    def build(cfg: dict):
        experiment = experiment_cls(cfg)
        experiment.tasks, experiment.phases = experiment.tasks[:2], experiment.phases[:2]
        return experiment

    build.config_namespaces = experiment_cls.config_namespaces
    return build


@pytest.fixture
def two_task_stream(monkeypatch):
    from server.experiments import EXPERIMENTS
    from server.experiments.continual import ContinualExperiment

    monkeypatch.setitem(EXPERIMENTS, "continual", _two_tasks(ContinualExperiment))


@pytest.mark.parametrize("seed", [3, pytest.param(4, marks=pytest.mark.slow), pytest.param(5, marks=pytest.mark.slow)])
def test_a_two_task_federated_run_gives_the_accuracy_matrix(tmp_path, task_identity, two_task_stream, seed):
    from fedsparse.results import read_rounds
    from server.loop import run_federation

    cfg = _run_config(tmp_path / "run", "finetune", 2) | {"seed": seed, "local-epochs": 3}
    grid = AppGrid(cfg, 3)
    summary = run_federation(grid, cfg)
    rows = read_rounds(tmp_path / "run" / "rounds.csv")
    names = stream_task_names("split-digits", cfg)[:2]
    assert [row["phase"] for row in rows] == ["task-1:0-1"] * 2 + ["task-2:2-3"] * 2
    matrix = np.array(summary["accuracy_matrix"], dtype=float)
    assert matrix.shape == (2, 2) and np.isnan(matrix[0, 1])
    assert matrix[0, 0] == pytest.approx(rows[1][f"acc/{names[0]}"])
    assert matrix[1, 1] == pytest.approx(rows[3][f"acc/{names[1]}"])
    assert matrix[1, 0] == pytest.approx(rows[3][f"acc/{names[0]}"])
    assert matrix[0, 0] > 0.9 and matrix[1, 1] > 0.9  # two easy 2-class tasks, learnt
    assert matrix[1, 0] < 0.5  # and the first forgotten: fine-tuning on labels 2, 3 only predicts those
    assert summary["average_accuracy"] == pytest.approx(matrix[1].mean())
    assert (tmp_path / "run" / "accuracy_matrix.csv").exists() and (tmp_path / "run" / "accuracy_matrix.png").exists()
    assert grid.handled.count("train.continual") == 12 and grid.handled.count("query.info") >= 3


@pytest.mark.parametrize("method", ["replay", "merge-ties", pytest.param("ewc", marks=pytest.mark.slow),
                                    pytest.param("sfa-client", marks=pytest.mark.slow),
                                    pytest.param("wise-ft", marks=pytest.mark.slow)])
def test_a_continual_run_killed_mid_task_and_resumed_ends_bit_identical(tmp_path, task_identity, two_task_stream,
                                                                      method):
    """Two tasks of 3 rounds. Uninterrupted, vs killed after the clients answered round 5 (task 2, round 2) and
    resumed with fresh nodes: the server re-runs round 5 from its round-4 checkpoint, the clients rewind their
    state (replay buffer, anchor, Fisher) from their disk snapshots; merge-ties / wise-ft: the merge at round 6
    needs theta_0 and task 1's model (or task 2's start) back from the server's checkpoint."""
    from server.loop import run_federation

    whole_cfg = _run_config(tmp_path / "whole", method, 3)
    run_federation(AppGrid(whole_cfg, 3), whole_cfg)
    part_cfg = _run_config(tmp_path / "part", method, 3)
    with pytest.raises(Stop):
        run_federation(AppGrid(part_cfg, 3, stop_after=5), part_cfg)
    shutil.copytree(tmp_path / "part", tmp_path / "forgetful")
    resumed_cfg = _run_config(tmp_path / "part", method, 3) | {"resume": True}
    run_federation(AppGrid(resumed_cfg, 3), resumed_cfg)
    whole = torch.load(tmp_path / "whole" / "final_model.pt")
    assert _same(whole, torch.load(tmp_path / "part" / "final_model.pt"))
    if method == "replay":  # the same resume with the clients' snapshots gone: their buffers are lost
        shutil.rmtree(tmp_path / "forgetful" / "client-state")
        forgetful_cfg = _run_config(tmp_path / "forgetful", method, 3) | {"resume": True}
        run_federation(AppGrid(forgetful_cfg, 3), forgetful_cfg)
        assert not _same(whole, torch.load(tmp_path / "forgetful" / "final_model.pt"))


@pytest.mark.parametrize("preset", ["cl-domains", "cl-split-fmnist", "cl-permuted-fmnist"])
def test_presets_resolve_and_num_rounds_covers_every_task(preset):
    import tomllib

    from tests.conftest import REPO, SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.skip("needs ../shared/data")
    cfg = resolve(tomllib.loads((REPO / "simulations" / "presets" / f"{preset}.toml").read_text()))
    assert cfg["experiment"] == "continual" and cfg["cl.stream"] == preset.removeprefix("cl-")
    assert cfg["num-rounds"] == len(stream_task_names(cfg["cl.stream"], cfg)) * cfg["cl.rounds-per-task"]


@pytest.mark.slow
def test_fedsparse_run_of_a_continual_experiment_on_ray(tmp_path):
    """The Flower simulation path: Ray clients, the one-off queries (anchor, Fisher), the files a run writes."""
    import json

    from tests.conftest import fedsparse_run

    fedsparse_run(tmp_path / "run", "experiment=continual", "dataset=digits", "model=mlp", "num-clients=3",
                  "partitioner=iid", "num-rounds=10", "cl.stream=split-digits", "cl.method=ewc",
                  "cl.rounds-per-task=2", "cl.train-size=0", "cl.test-size=0", "cl.fisher-examples=20")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["accuracy_matrix"]) == 5 and summary["bytes_oneoff"] > 0  # anchors and Fishers counted
    assert (tmp_path / "run" / "accuracy_matrix.png").exists()


@pytest.mark.parametrize("setting,key", [("num-rounds=3", "'num-rounds'"), ("strategy=ssfl", "'strategy'"),
                                         ("cl.num-tasks=9", "'cl.num-tasks'"),
                                         ("cl.merge-alpha=1.5", "'cl.merge-alpha'"),
                                         ("cl.merge-lambda=-1", "'cl.merge-lambda'"),
                                         ("cl.merge-density=0", "'cl.merge-density'"),
                                         ("cl.method=merge", "'cl.method'")])
def test_continual_settings_are_refused_before_ray_naming_the_key(tmp_path, capsys, setting, key):
    from fedsparse.cli import main as cli_main

    base = ["experiment=continual", "dataset=digits", "model=mlp", "num-clients=3", "partitioner=iid",
            "cl.stream=split-digits", "cl.rounds-per-task=1", "num-rounds=5"]
    assert cli_main(["run", "--set", *base, setting, "--out", str(tmp_path / "run")]) == 2
    assert key in capsys.readouterr().err


# ------------------------------------------------------------------------------------- merge after each task


@pytest.mark.parametrize("method", ["merge-ta", "wise-ft"])
def test_merge_after_task_replaces_only_a_tasks_last_round_and_not_the_first_task(method):
    experiment = _experiment(method=method, rounds_per_task=3, merge_lambda=0.5, merge_alpha=0.25)
    theta_0 = {key: value.clone() for key, value in experiment.model.state_dict().items()}
    experiment.on_start(_context(experiment, 0, theta_0))
    for round_in_task in (1, 2, 3):  # task 1: kept as trained
        moved = {key: value + round_in_task for key, value in theta_0.items()}
        out = experiment.after_round(_context(experiment, 0, moved), round_in_task, ArrayRecord(moved))
        assert _same(out.to_torch_state_dict(), moved)
    theta_1 = moved
    experiment.on_start(_context(experiment, 1, theta_1))
    for round_in_task in (1, 2):
        moved = {key: value * 2.0 for key, value in theta_1.items()}
        assert _same(experiment.after_round(_context(experiment, 1, moved), round_in_task,
                                           ArrayRecord(moved)).to_torch_state_dict(), moved)
    theta_2 = {key: value * 2.0 - 1.0 for key, value in theta_1.items()}
    merged = experiment.after_round(_context(experiment, 1, theta_2), 3, ArrayRecord(theta_2)).to_torch_state_dict()
    for key, value in theta_2.items():
        if method == "merge-ta":
            expected = theta_0[key] + 0.5 * ((theta_1[key] - theta_0[key]) + (value - theta_0[key]))
        else:
            expected = 0.75 * theta_1[key] + 0.25 * value
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-5)


def _merge_run(tmp_path, name: str, method: str, **cl: object) -> tuple[dict, dict]:
    """A two-task run of 2 rounds a task (task_identity and two_task_stream needed); (final model, the merger's
    state in the last checkpoint)."""
    from server.loop import run_federation

    cfg = _run_config(tmp_path / name, method, 2, **cl)
    run_federation(AppGrid(cfg, 3), cfg)
    checkpoint = torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)
    return torch.load(tmp_path / name / "final_model.pt"), checkpoint["experiment"]["merge"]


def test_merge_after_task_runs_by_hand_wise_ft_ends_and_task_arithmetic(tmp_path, task_identity, two_task_stream):
    """Through the runner and the real clients: the kept per-task models of a merge-ta run are fine-tuning's (task
    2 starts from task 1's unmerged model), its final model is theta_0 + lambda (tau_1 + tau_2) of them; WiSE-FT
    with alpha 1 ends exactly as fine-tuning, with alpha 0 exactly on task 1's model."""
    from fedsparse.results import read_rounds
    from fedsparse.train import evaluate
    from server.experiments.continual import ContinualExperiment

    finetuned, _ = _merge_run(tmp_path, "finetune", "finetune")
    merged, kept = _merge_run(tmp_path, "ta", "merge-ta", **{"merge-lambda": 0.8})
    theta_0 = ContinualExperiment(_run_config(tmp_path / "x", "merge-ta", 2)).model.state_dict()
    assert _same(kept["initial"], theta_0) and len(kept["task_models"]) == 2
    theta_1, theta_2 = kept["task_models"]
    assert _same(theta_2, finetuned) and not _same(theta_1, theta_2)
    for key, value in theta_0.items():
        by_hand = value + 0.8 * ((theta_1[key] - value) + (theta_2[key] - value))
        torch.testing.assert_close(merged[key], by_hand, rtol=0, atol=1e-6)
    rows = read_rounds(tmp_path / "ta" / "rounds.csv")  # the matrix's last row is the merged model's accuracy
    model = _loaded(merged)
    for name in stream_task_names("split-digits", _cfg())[:2]:
        task = load_task(name, _cfg())
        assert rows[-1][f"acc/{name}"] == pytest.approx(evaluate(model, task.x_test, task.y_test)[1])
    assert _same(_merge_run(tmp_path, "wise1", "wise-ft", **{"merge-alpha": 1.0})[0], finetuned)
    assert _same(_merge_run(tmp_path, "wise0", "wise-ft", **{"merge-alpha": 0.0})[0], theta_1)


@pytest.mark.slow
def test_wise_ft_after_each_task_is_server_sfa_averaging_only_at_task_ends(tmp_path, task_identity, two_task_stream):
    """WiSE-FT with alpha a is server-side SFA with p = 1 and beta = 1 - a (the same rule; float order differs)."""
    wise, _ = _merge_run(tmp_path, "wise", "wise-ft", **{"merge-alpha": 0.3})
    sfa, _ = _merge_run(tmp_path, "sfa", "sfa", **{"sfa-p": 1.0, "sfa-beta": 0.7})
    for key, value in wise.items():
        torch.testing.assert_close(value, sfa[key], rtol=1e-5, atol=1e-6)
