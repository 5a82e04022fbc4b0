"""The unlearn experiment's registry methods as federated rounds (`client.unlearning_local`,
`server.experiments.unlearning_local`).

Runs use the offline `digits` dataset, a small MLP and 3 in-process clients running the real ClientApp: 1 FedAvg
round on all, then 2 unlearning rounds in which every client runs the method on its own retain / forget parts
(sample-level `uniform` forget set: every client forgets 10% of its examples) and the server averages.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from client.unlearning import client_parts
from client.unlearning_local import (
    LOCAL_METHODS,
    LOCAL_TRAIN_MESSAGE,
    TEACHER_RECORD,
    ClientParts,
    PhaseStep,
    local_method,
    phase_settings,
    run_local_method,
    scrub_from_teacher,
    unlearn_local,
)
from fedsparse.config import UNLEARN_LOCAL_METHODS, resolve
from fedsparse.models import build_model
from fedsparse.train import evaluate
from fedsparse.unlearning import UNLEARNING_METHODS, ArrayData, UnlearnConfig, unlearn
from fedsparse.unlearning.methods.scrub import scrub

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIENTS = 3
RUN = {"experiment": "unlearn", "dataset": "digits", "model": "mlp", "num-clients": CLIENTS, "partitioner": "iid",
       "local-epochs": 1, "batch-size": 16, "lr": 0.05, "momentum": 0.5, "seed": 3, "num-rounds": 3}


def _cfg(out, method: str, seed: int = 3, **unlearn_keys: object) -> dict:
    keys = {"method": method, "forget": "uniform", "forget-fraction": 0.1, "train-rounds": 1, "rounds": 2,
            **unlearn_keys}
    return resolve({**RUN, "seed": seed, "output-dir": str(out), "unlearn": keys})


class RecordingGrid:
    """In-process nodes (node id 100 + partition) running the real ClientApp, each with its own Context; keeps
    every message it delivers as (message type, partition, content)."""

    def __init__(self, cfg: dict) -> None:
        from flwr.app import Context

        from client.client_app import build_app

        self.app = build_app()
        self.contexts = {100 + p: Context(run_id=1, node_id=100 + p, state=RecordDict(), run_config=cfg,
                                          node_config={"partition-id": p, "num-partitions": CLIENTS})
                         for p in range(CLIENTS)}
        self.delivered: list[tuple[str, int, RecordDict]] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        answers = []
        for message in messages:
            self.delivered.append((message.metadata.message_type, message.metadata.dst_node_id - 100,
                                   message.content))
            try:
                answers.append(self.app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as err:  # noqa: BLE001  (as Flower: a client exception is an error reply)
                answers.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message))
        return answers


def _run(cfg: dict) -> tuple[dict, RecordingGrid]:
    from server.loop import run_federation

    grid = RecordingGrid(cfg)
    return run_federation(grid, cfg), grid


def _parts(cfg: dict, partition: int) -> ClientParts:
    from client.handlers import local_data

    x, y = local_data(cfg, partition)
    retain, forget = client_parts(cfg, partition, x, y)
    return ClientParts(retain, forget)


def _row_keys(x: np.ndarray) -> list[bytes]:
    """Each example's bytes, in order (to recognise an example wherever it turns up)."""
    return [row.tobytes() for row in np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)]


def _rows(x: np.ndarray) -> set[bytes]:
    return set(_row_keys(x))


def _model(cfg: dict, state: dict) -> torch.nn.Module:
    model = build_model("mlp", (1, 16, 16), 10, seed=0)
    model.load_state_dict(state)
    return model


def test_the_local_methods_are_the_registrys_and_unlearn_method_accepts_them():
    assert LOCAL_METHODS == UNLEARN_LOCAL_METHODS
    assert set(LOCAL_METHODS) <= set(UNLEARNING_METHODS)
    assert set(LOCAL_METHODS) | {"retrain", "finetune", "del"} == set(UNLEARNING_METHODS)
    with pytest.raises(ValueError, match="not a local unlearning method"):
        local_method("del", True)


@pytest.mark.parametrize("method", LOCAL_METHODS)
def test_each_method_runs_federated_rounds_on_each_clients_own_data_only(tmp_path, task_identity, monkeypatch,
                                                                        method):
    """Through the runner and the real ClientApp: every client of the phase gets `train.unlearn_local` naming the
    method, every input a gradient is taken on in it is one of that client's own training examples (its forget
    part among them, but for l1_sparse, which never reads it), and scrub's rounds carry the phase-start teacher."""
    import client.handlers
    from client.handlers import HANDLERS, model_and_layout

    cfg = _cfg(tmp_path, method)
    own = {p: _rows(client.handlers.local_data(cfg, p)[0]) for p in range(CLIENTS)}
    seen: dict[int, set[bytes]] = {p: set() for p in range(CLIENTS)}
    current: list[int] = []

    def record(module, inputs):
        if torch.is_grad_enabled() and current:
            seen[current[-1]].update(_rows(inputs[0].detach().cpu().numpy()))

    original = HANDLERS[LOCAL_TRAIN_MESSAGE]

    def handler(content, state, run_cfg, partition_id):
        current.append(partition_id)
        try:
            return original(content, state, run_cfg, partition_id)
        finally:
            current.pop()

    monkeypatch.setitem(HANDLERS, LOCAL_TRAIN_MESSAGE, handler)
    hook = model_and_layout(cfg)[0].register_forward_pre_hook(record)
    try:
        summary, grid = _run(cfg)
    finally:
        hook.remove()
    local = [(p, content) for kind, p, content in grid.delivered if kind == LOCAL_TRAIN_MESSAGE]
    assert sorted(p for p, _ in local) == sorted(2 * list(range(CLIENTS)))  # 2 rounds, every client
    assert {str(content["config"]["unlearn-method"]) for _, content in local} == {method}
    assert [int(content["config"]["phase-round"]) for _, content in local] == [1] * CLIENTS + [2] * CLIENTS
    assert summary["phases"][1]["name"] == f"unlearn:{method}" and summary["unlearn_rounds"] == 2
    for partition in range(CLIENTS):
        assert seen[partition], partition  # the instrument sees the training
        assert seen[partition] <= own[partition], f"partition {partition} took a gradient on another's data"
        forget_rows = _rows(_parts(cfg, partition).forget.x)
        reads_forget = method not in ("l1_sparse",)
        assert bool(seen[partition] & forget_rows) == reads_forget
    final = torch.load(tmp_path / "final_model.pt")
    assert all(torch.isfinite(v).all() for v in final.values())
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["experiment"]["trained"]
    assert not all(torch.equal(final[k], trained[k]) for k in trained)  # the phase moved the model
    teachers = [content[TEACHER_RECORD].to_torch_state_dict() for _, content in local if TEACHER_RECORD in content]
    assert len(teachers) == (2 * CLIENTS if method == "scrub" else 0)
    for teacher in teachers:  # round 2's teacher too: the model at the phase start (the trained one)
        assert all(torch.equal(teacher[k], trained[k]) for k in trained)


@pytest.mark.parametrize("seed", [0, 4])
def test_gradient_ascent_raises_the_forget_loss_after_a_federated_round(tmp_path, task_identity, seed):
    """One round of federated gradient ascent (2 local epochs at lr 0.1) after one FedAvg round. Checked over seeds
    0-4: the forget loss rose by 0.57 to 30, the forget accuracy fell by 0.40 to 0.60 (to 0.08-0.12)."""
    cfg = _cfg(tmp_path, "gradient_ascent", seed=seed, rounds=1, **{"local-lr": 0.1})
    cfg["num-rounds"], cfg["local-epochs"] = 2, 2
    _run(cfg)
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["experiment"]["trained"]
    final = torch.load(tmp_path / "final_model.pt")
    forget = [_parts(cfg, p).forget for p in range(CLIENTS)]
    x, y = np.concatenate([f.x for f in forget]), np.concatenate([f.y for f in forget])
    before, after = evaluate(_model(cfg, trained), x, y), evaluate(_model(cfg, final), x, y)
    assert after[0] > before[0] + 0.4 and after[1] < before[1] - 0.3, (before, after)


def _random_label_batches(monkeypatch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Record every minibatch random-label training draws."""
    import fedsparse.unlearning.methods.random_label as random_label_module

    drawn: list[tuple[np.ndarray, np.ndarray]] = []
    original = random_label_module.batches

    def batches(data, batch_size, generator, device):
        for xb, yb in original(data, batch_size, generator, device):
            drawn.append((xb.cpu().numpy(), yb.cpu().numpy()))
            yield xb, yb

    monkeypatch.setattr(random_label_module, "batches", batches)
    return drawn


@pytest.mark.parametrize("partition", [0, 2])
def test_random_label_never_assigns_the_true_label_in_the_client_path(tmp_path, task_identity, monkeypatch,
                                                                      partition):
    from server.experiments.unlearning_local import LocalUnlearnFedAvg

    cfg = _cfg(tmp_path, "random_label", **{"local-lr": 0.01})
    drawn = _random_label_batches(monkeypatch)
    model = build_model("mlp", (1, 16, 16), 10, seed=0)
    strategy = LocalUnlearnFedAvg(maskable=[], **LocalUnlearnFedAvg.config_arguments(cfg))
    state = strategy.bind(ArrayRecord({k: v.clone() for k, v in model.state_dict().items()}))
    reply = unlearn_local(strategy.train_content(2, state), RecordDict(), cfg, partition)
    assert int(reply["metrics"]["num-examples"]) == sum(len(part) for part in vars(_parts(cfg, partition)).values())
    parts = _parts(cfg, partition)
    true_label = {row: int(label) for row, label in zip(_row_keys(parts.forget.x), parts.forget.y, strict=True)}
    retain_label = {row: int(label) for row, label in zip(_row_keys(parts.retain.x), parts.retain.y, strict=True)}
    relabelled = 0
    for xb, yb in drawn:
        for row, label in zip(_row_keys(xb), yb, strict=True):
            if row in true_label and row not in retain_label:
                assert int(label) != true_label[row]
                relabelled += 1
            elif row in retain_label and row not in true_label:
                assert int(label) == retain_label[row]  # the retain part keeps its labels
    assert relabelled == len(parts.forget) > 0  # every forget example drawn once (1 local epoch), none kept its label


@pytest.mark.parametrize("method", ["gradient_ascent", "neggrad_plus", "random_label", "salun"])
def test_a_client_without_forget_data_finetunes_on_its_retain_part(method):
    model = build_model("mlp", (1, 16, 16), 10, seed=0)
    rng = np.random.default_rng(0)
    retain = ArrayData(rng.standard_normal((40, 1, 16, 16)).astype(np.float32), rng.integers(0, 10, 40))
    empty = retain.subset(np.zeros(40, dtype=bool))
    settings = UnlearnConfig(epochs=1, batch_size=8, lr=0.05)
    assert local_method(method, holds_forget_data=False) == "finetune"
    got = run_local_method(method, model, ClientParts(retain, empty), settings)
    want = unlearn("finetune", model, retain, empty, settings)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values(), strict=True))


def test_scrub_with_the_model_as_teacher_is_the_librarys_scrub():
    model = build_model("mlp", (1, 16, 16), 10, seed=0)
    rng = np.random.default_rng(1)
    retain = ArrayData(rng.standard_normal((32, 1, 16, 16)).astype(np.float32), rng.integers(0, 10, 32))
    forget = ArrayData(rng.standard_normal((16, 1, 16, 16)).astype(np.float32), rng.integers(0, 10, 16))
    settings = UnlearnConfig(epochs=2, batch_size=8, lr=0.05, scrub_max_epochs=1)
    got = scrub_from_teacher(model, copy.deepcopy(model), retain, forget, settings)
    want = scrub(model, retain, forget, settings)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values(), strict=True))
    other_teacher = build_model("mlp", (1, 16, 16), 10, seed=5)
    moved = scrub_from_teacher(model, other_teacher, retain, forget, settings)
    assert not all(torch.equal(a, b) for a, b in zip(moved.state_dict().values(), want.state_dict().values(),
                                                       strict=True))


def test_the_whole_phase_schedules_map_onto_rounds(tmp_path):
    cfg = _cfg(tmp_path, "scrub", **{"scrub-max-epochs": 3, "l1-coefficient": 0.01, "local-lr": 0.02})
    cfg["local-epochs"] = 2
    rounds = [phase_settings(cfg, 0.05, PhaseStep(r, 4), seed=0, device="cpu") for r in (1, 2, 3, 4)]
    assert [s.scrub_max_epochs for s in rounds] == [3, 1, 0, 0]  # epochs 1-3 of the phase run the max pass
    assert [s.l1_coefficient for s in rounds] == pytest.approx([0.01, 0.0075, 0.005, 0.0025])
    assert {s.lr for s in rounds} == {0.02} and {s.epochs for s in rounds} == {2}
    cfg["unlearn.local-lr"] = 0.0
    assert phase_settings(cfg, 0.05, PhaseStep(1, 4), seed=0, device="cpu").lr == 0.05  # the round's lr
    with pytest.raises(ValueError, match="phase round"):
        PhaseStep(5, 4)


def test_the_preset_resolves_to_a_sample_level_run_of_a_registry_method():
    import tomllib

    from server.experiments.unlearning import UnlearnExperiment
    from tests.conftest import REPO

    cfg = resolve(tomllib.loads((REPO / "simulations" / "presets" / "unlearn-fmnist.toml").read_text()))
    assert cfg["experiment"] == "unlearn" and cfg["unlearn.method"] in LOCAL_METHODS
    assert cfg["unlearn.forget"] == "uniform" and cfg["dataset"] == "fashion-mnist" and cfg["model"] == "cnn"
    UnlearnExperiment.check_config(cfg)  # num-rounds covers both phases
    for method in LOCAL_METHODS:
        UnlearnExperiment.check_config({**cfg, "unlearn.method": method})


def test_a_registry_method_on_a_withdrawal_is_refused_naming_the_key():
    from fedsparse.config import ConfigError
    from server.experiments.unlearning import UnlearnExperiment

    cfg = resolve({**RUN, "unlearn": {"method": "neggrad_plus", "forget": "client", "train-rounds": 1, "rounds": 2}})
    with pytest.raises(ConfigError, match="'unlearn.forget'"):
        UnlearnExperiment.check_config(cfg)


@pytest.mark.slow
def test_fedsparse_run_of_scrub_rounds_on_ray(tmp_path):
    """The Flower simulation path: Ray clients run train.unlearn_local (with the teacher record) and reply."""
    from tests.conftest import fedsparse_run, summary

    fedsparse_run(tmp_path / "run", "experiment=unlearn", "dataset=digits", "model=mlp", "num-clients=3",
                  "partitioner=iid", "num-rounds=3", "unlearn.train-rounds=2", "unlearn.rounds=1",
                  "unlearn.method=scrub", "unlearn.forget=uniform")
    result = summary(tmp_path / "run")
    assert result["unlearn_method"] == "scrub" and result["unlearn_rounds"] == 1
    assert result["phases"][1]["name"] == "unlearn:scrub" and 0.0 <= result["mia_auc"] <= 1.0
