"""Unlearning as federated rounds: the unlearn experiment (`server.experiments.unlearning`) and its client handlers
(`client.unlearning`): forget sets, retrain / finetune / federated DEL / FedEraser, the masked-values transport of
the DEL rounds and the freeze mask of a late joiner.

Runs use the offline `digits` dataset, a small MLP and 3 in-process clients running the real ClientApp
(`RecordingGrid`): 2 FedAvg rounds on all, then 2 unlearning rounds. Runs that several tests read are made once
per module (`runs`). The library-level checks of DEL (localization, reset, freeze mode) are in the unlearning
library's own tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.unlearning import (
    FREEZE_MESSAGE,
    MASK_MESSAGE,
    NO_FREEZE,
    TRAIN_MESSAGE,
    forget_split,
    freeze_layout,
    pack_parameter_mask,
    unlearn_mask,
    unpack_parameter_mask,
)
from fedsparse import sparse, transport
from fedsparse.config import ConfigError, resolve
from fedsparse.data import client_split, load_dataset
from fedsparse.models import build_model
from fedsparse.unlearning.localization import mask_fraction
from fedsparse.unlearning.methods.deletion_by_localization import head_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WITHDRAWN = 0
RUN = {"experiment": "unlearn", "dataset": "digits", "model": "mlp", "num-clients": 3, "partitioner": "iid",
       "local-epochs": 1, "batch-size": 16, "lr": 0.05, "momentum": 0.5, "seed": 3, "num-rounds": 4}


def _cfg(out, method: str, run: dict | None = None, **unlearn: object) -> dict:
    keys = {"method": method, "client": WITHDRAWN, "train-rounds": 2, "rounds": 2, **unlearn}
    return resolve({**RUN, **(run or {}), "output-dir": str(out), "unlearn": keys})


class Stop(Exception):
    """Raised by RecordingGrid to kill a run after its clients answered a given round."""


class RecordingGrid:
    """In-process nodes (node id 100 + partition) running the real ClientApp, each with its own Context; records
    every (message type, partition) it delivers and every error reply. A partition in `late` connects only once
    a message of the type it maps to was delivered; `wipe_after` empties one node's state once (a restart);
    `stop_after` kills the run once the clients answered that run round."""

    def __init__(self, cfg: dict, num_nodes: int, late: dict[int, str] | None = None,
                 wipe_after: tuple[str, int] | None = None, stop_after: int | None = None) -> None:
        from flwr.app import Context

        from client.client_app import build_app

        self.app = build_app()
        self.contexts = {100 + p: Context(run_id=1, node_id=100 + p, state=RecordDict(), run_config=cfg,
                                          node_config={"partition-id": p, "num-partitions": num_nodes})
                         for p in range(num_nodes)}
        self.late = dict(late or {})
        self.wipe_after = wipe_after  # (message type, partition): that node's state is lost after the first one
        self.stop_after = stop_after  # run round after whose train replies the run is killed (never aggregated)
        self.delivered: list[tuple[str, int]] = []
        self.errors: list[tuple[str, int, str]] = []

    def get_node_ids(self):
        return [node for node in self.contexts if node - 100 not in self.late]

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        answers = []
        for message in messages:
            kind, partition = message.metadata.message_type, message.metadata.dst_node_id - 100
            self.delivered.append((kind, partition))
            try:
                answers.append(self.app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as err:  # noqa: BLE001  (as Flower: a client exception is an error reply)
                self.errors.append((kind, partition, f"{type(err).__name__}: {err}"))
                answers.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message))
            self.late = {p: after for p, after in self.late.items() if after != kind}
            if self.wipe_after == (kind, partition):
                self.contexts[message.metadata.dst_node_id].state = RecordDict()
                self.wipe_after = None
        rounds = {int(m.content["config"]["server-round"]) for m in messages
                  if m.metadata.message_type.startswith("train")}
        if self.stop_after is not None and self.stop_after in rounds:
            raise Stop(f"killed after the clients answered round {self.stop_after}")
        return answers


def _run(cfg: dict, grid: RecordingGrid | None = None) -> tuple[dict, RecordingGrid]:
    from server.loop import run_federation

    grid = grid or RecordingGrid(cfg, cfg["num-clients"])
    return run_federation(grid, cfg), grid


def _mlp() -> torch.nn.Module:
    return build_model("mlp", (1, 16, 16), 10, seed=0)


CACHED_RUNS = {"del": ("del", {"transport": "values"}), "del-dense": ("del", {"transport": "dense"}),
               "finetune": ("finetune", {}), "retrain": ("retrain", {}),
               "federaser": ("federaser", {"federaser-interval": 1})}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs several tests read, made once: name -> (summary, grid, run folder)."""
    from flwr.supercore.task_identity import TaskIdentity

    made: dict[str, tuple[dict, RecordingGrid, object]] = {}

    def get(name: str):
        if name not in made:
            old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
            torch.set_num_threads(1)
            try:
                method, keys = CACHED_RUNS[name]
                out = tmp_path_factory.mktemp(name)
                summary, grid = _run(_cfg(out, method, **keys))
                made[name] = (summary, grid, out)
            finally:
                TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old
        return made[name]

    return get


# ------------------------------------------------------------------------------------------------ forget sets


@pytest.mark.parametrize("mode", ["client", "client-samples", "uniform", "class"])
@pytest.mark.parametrize("fraction", [0.1, 0.35])
def test_forget_split_is_disjoint_exact_in_size_and_deterministic(tmp_path, mode, fraction):
    cfg = _cfg(tmp_path, "retrain", forget=mode, **{"forget-fraction": fraction, "forget-class": 3})
    labels = load_dataset("digits", cfg["data-root"]).y_train
    for partition in range(3):
        y = labels[client_split(cfg, partition)[0]]
        split = forget_split(cfg, partition, y)
        assert np.intersect1d(split.retain, split.forget).size == 0
        assert np.array_equal(np.sort(np.concatenate([split.retain, split.forget])), np.arange(len(y)))
        if mode == "class":
            candidates = int((y == 3).sum())
            assert len(split.forget) == round(fraction * candidates) and bool((y[split.forget] == 3).all())
        elif mode == "uniform" or partition == WITHDRAWN:
            assert len(split.forget) == (len(y) if mode == "client" else round(fraction * len(y)))
        else:
            assert len(split.forget) == 0
        again = forget_split(cfg, partition, y)
        assert np.array_equal(again.forget, split.forget)
    other_seed = forget_split({**cfg, "seed": cfg["seed"] + 1}, 1, labels[client_split(cfg, 1)[0]])
    if mode == "uniform":  # the draw follows the seed (the partition's examples stay the same positions' count)
        assert not np.array_equal(other_seed.forget, forget_split(cfg, 1, labels[client_split(cfg, 1)[0]]).forget)


def test_the_experiments_forget_and_retain_sets_follow_the_clients_split(tmp_path):
    from server.experiments.unlearning import UnlearnExperiment

    cfg = _cfg(tmp_path, "finetune", forget="uniform", **{"forget-fraction": 0.2})
    experiment = UnlearnExperiment(cfg)
    data = load_dataset("digits", cfg["data-root"])
    sizes = [len(client_split(cfg, p)[0]) for p in range(3)]
    assert len(experiment.forget) == sum(round(0.2 * n) for n in sizes)
    assert len(experiment.forget) + len(experiment.retain) == sum(sizes)
    index = client_split(cfg, 1)[0]
    split = forget_split(cfg, 1, data.y_train[index])
    first = sum(round(0.2 * n) for n in sizes[:1])  # client 1's forget examples follow client 0's
    assert np.array_equal(experiment.forget.x[first:first + len(split.forget)], data.x_train[index[split.forget]])


@pytest.mark.parametrize("keys,key", [({"forget": "class", "forget-class": 10}, "'unlearn.forget-class'"),
                                      ({"forget": "class", "forget-fraction": 0.001}, "'unlearn.forget-fraction'")])
def test_a_forget_set_that_cannot_exist_is_refused_naming_the_key(tmp_path, keys, key):
    """digits has 10 classes; 0.1% of a client's ~50 examples of a class rounds to an empty forget set."""
    from server.experiments.unlearning import UnlearnExperiment

    with pytest.raises(ConfigError, match=key):
        UnlearnExperiment(_cfg(tmp_path, "finetune", **keys))


def _tagged_examples(monkeypatch) -> dict[str, list[np.ndarray]]:
    """Every training example carries its dataset index in pixel (0, 0, 0); records the indices each
    `train.unlearn` round trains on, by partition."""
    import client.handlers
    import client.unlearning

    original_data, original_update = client.handlers.local_data, client.unlearning.local_update
    seen: dict[str, list[np.ndarray]] = {}

    def local_data(cfg, partition_id, split="train"):
        x, y = original_data(cfg, partition_id, split)
        x = x.copy()
        x[:, 0, 0, 0] = client_split(cfg, partition_id)[0 if split == "train" else 1]
        return x, y

    def local_update(content, state, cfg, partition_id, *, data=None, **kwargs):
        seen.setdefault(partition_id, []).append(np.rint(data[0][:, 0, 0, 0]).astype(np.int64))
        return original_update(content, state, cfg, partition_id, data=data, **kwargs)

    monkeypatch.setattr(client.handlers, "local_data", local_data)
    monkeypatch.setattr(client.unlearning, "local_update", local_update)
    return seen


@pytest.mark.parametrize("method,mode", [("retrain", "uniform"), ("del", "client-samples")])
def test_forget_examples_never_reach_a_gradient_in_the_unlearning_rounds(tmp_path, task_identity, monkeypatch,
                                                                          method, mode):
    """Each client trains, in every unlearning round, on exactly its retain part (never a forget example); with
    client-samples the forgetting client keeps training (on its retain part), and del localizes on its forget part."""
    seen = _tagged_examples(monkeypatch)
    cfg = _cfg(tmp_path, method, forget=mode, **{"forget-fraction": 0.3})
    summary, grid = _run(cfg)
    labels = load_dataset("digits", cfg["data-root"]).y_train
    forgotten = 0
    for partition in range(3):
        index = client_split(cfg, partition)[0]
        split = forget_split(cfg, partition, labels[index])
        forgotten += len(split.forget)
        assert len(seen[partition]) == 2  # both unlearning rounds, every client (sample-level: nobody withdraws)
        for trained_on in seen[partition]:
            assert np.array_equal(np.sort(trained_on), index[split.retain])
            assert np.intersect1d(trained_on, index[split.forget]).size == 0
    assert summary["forget_examples"] == forgotten > 0 and summary["unlearn_forget"] == mode
    assert not grid.errors
    if method == "del":
        assert grid.delivered.count((MASK_MESSAGE, WITHDRAWN)) == 1 and (FREEZE_MESSAGE, WITHDRAWN) in grid.delivered


# ------------------------------------------------------------------------------------------------ DEL


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_the_withdrawing_clients_del_mask_selects_alpha_of_the_parameters_in_whole_channels(tmp_path, alpha):
    cfg = _cfg(tmp_path, "del", alpha=alpha)
    model = _mlp()
    content = RecordDict({"model": ArrayRecord({k: v.clone() for k, v in model.state_dict().items()}),
                          "config": ConfigRecord({"alpha": alpha})})
    reply = unlearn_mask(content, RecordDict(), cfg, WITHDRAWN)
    bits = reply["mask"]["bits"].numpy()
    total = sum(p.numel() for p in model.parameters())
    assert len(bits) == math.ceil(total / 8)  # 1 bit per parameter: the scores never leave the client
    mask = unpack_parameter_mask(bits, model)
    largest_row = max(p.shape[1] for p in model.parameters() if p.ndim > 1)
    assert alpha <= mask_fraction(mask, model) < alpha + largest_row / total
    assert int(reply["metrics"]["selected"]) == sum(int(m.sum()) for m in mask.values())
    for name, p in model.named_parameters():
        if p.ndim > 1:  # whole output channels
            rows = mask[name].reshape(p.shape[0], -1)
            assert bool((rows.all(dim=1) | ~rows.any(dim=1)).all()), name
    assert np.array_equal(pack_parameter_mask(mask, model), bits)


def _trainable(run_dir) -> tuple[dict, dict, dict]:
    """(trained model, final model, trainable mask = localization mask + head) of a del run."""
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["experiment"]
    trained, mask = saved["trained"], saved["mask"]
    final = torch.load(run_dir / "final_model.pt")
    head = head_mask(_mlp())
    return trained, final, {name: mask[name] | head.get(name, torch.zeros_like(mask[name])) for name in mask}


def test_federated_del_changes_only_the_mask_and_head_never_trains_the_withdrawn_client(runs):
    summary, grid, run_dir = runs("del")
    trained, final, trainable = _trainable(run_dir)
    for name, keep in trainable.items():  # outside the mask and head: bit-identical after the unlearning phase
        assert torch.equal(final[name][~keep], trained[name][~keep]), name
    changed = sum(int((final[n] != trained[n])[trainable[n]].sum()) for n in trainable)
    assert changed > 0.9 * sum(int(t.sum()) for t in trainable.values())  # reset and finetuned
    assert summary["del_mask_fraction"] == pytest.approx(0.3, abs=0.01)
    # the withdrawn client: asked for its mask, never sent a train message of phase 2 nor the freeze mask
    unlearning = grid.delivered[grid.delivered.index((MASK_MESSAGE, WITHDRAWN)):]
    assert (TRAIN_MESSAGE, WITHDRAWN) not in grid.delivered and (FREEZE_MESSAGE, WITHDRAWN) not in grid.delivered
    assert unlearning.count((TRAIN_MESSAGE, 1)) == 2 and unlearning.count((TRAIN_MESSAGE, 2)) == 2
    assert [kind for kind, _ in grid.delivered].count("train") == 6  # phase 1 trained all three
    assert not grid.errors
    # the mask record's bytes are one-off traffic: exactly what a finetune run (same discovery) does not spend
    exchange = summary["unlearn_exchange_bytes"]
    total = sum(p.numel() for p in _mlp().parameters())
    assert exchange[MASK_MESSAGE]["up"] >= math.ceil(total / 8)
    finetune = runs("finetune")[0]
    assert summary["bytes_oneoff"] - finetune["bytes_oneoff"] == summary["unlearn_oneoff_bytes"] == sum(
        counted["down"] + counted["up"] for counted in exchange.values())
    assert summary["unlearn_rounds"] == 2 and summary["unlearn_transport"] == "values"
    assert 0.0 <= summary["mia_auc"] <= 1.0 and summary["phases"][1]["name"] == "unlearn:del"


def test_dense_del_rounds_cost_what_finetune_rounds_do_but_the_fingerprint(runs):
    """With the dense transport the DEL rounds carry the whole model: finetune's bytes, but for the freeze
    fingerprint (16 characters, not "none") in the 4 train messages."""
    dense, finetune = runs("del-dense")[0], runs("finetune")[0]
    assert dense["unlearn_round_bytes"] - finetune["unlearn_round_bytes"] == 4 * (16 - len(NO_FREEZE))


def test_masked_values_transport_moves_only_the_trainable_values_and_leaves_the_model_bit_identical(runs):
    """The values transport: the same final model, bit for bit, as the dense one; each of the 4 train messages and
    its reply carry the trainable values instead of the whole model (exact count), and the freeze install carries
    the frozen values once per client."""
    values, _, values_dir = runs("del")
    dense, _, dense_dir = runs("del-dense")
    final_values, final_dense = torch.load(values_dir / "final_model.pt"), torch.load(dense_dir / "final_model.pt")
    assert final_values.keys() == final_dense.keys()
    assert all(torch.equal(final_values[k], final_dense[k]) for k in final_values)
    _, _, trainable = _trainable(values_dir)
    model = _mlp()
    layout, standard = freeze_layout(model), sparse.Layout.of(model.state_dict(), [])
    kept = sum(int(t.sum()) for t in trainable.values())
    total = sum(p.numel() for p in model.parameters())
    assert sparse.num_values(layout, trainable) == (kept, 0)  # the MLP has no buffers

    def payload(num_values: int, num_dense: int) -> int:
        return transport.make_payload(torch.zeros(num_values), torch.zeros(num_dense), "float32").count_bytes()

    per_message = payload(0, standard.num_dense) - payload(kept, 0)  # the same in a train message and its reply
    fingerprint = 16 - len(sparse.NO_MASK)  # mask-fingerprint: the freeze fingerprint instead of "dense", both ways
    assert dense["unlearn_round_bytes"] - values["unlearn_round_bytes"] == 4 * 2 * (per_message - fingerprint)
    assert per_message >= 4 * (total - kept)
    down = {kind: counted["down"] for kind, counted in values["unlearn_exchange_bytes"].items()}
    dense_down = {kind: counted["down"] for kind, counted in dense["unlearn_exchange_bytes"].items()}
    frozen_values = transport.make_payload(torch.zeros(total - kept), torch.zeros(0), "float32")["values"]
    assert down[FREEZE_MESSAGE] - dense_down[FREEZE_MESSAGE] == 2 * ArrayRecord({"values": frozen_values}).count_bytes()


def test_a_client_that_joins_late_or_loses_its_state_gets_the_freeze_mask_before_its_next_del_round(
        tmp_path, task_identity):
    """Client 2 connects only after the freeze mask was installed on the others: the unlearning strategy installs
    it (with the frozen values) before client 2's first train message, which then trains in freeze mode. Client 1
    loses its state after its first unlearning round: its second fails (FreezeMaskMissing), the strategy installs
    the mask again and its third trains."""
    cfg = _cfg(tmp_path, "del", run={"min-clients": 2, "num-rounds": 5}, rounds=3)
    grid = RecordingGrid(cfg, 3, late={2: FREEZE_MESSAGE}, wipe_after=(TRAIN_MESSAGE, 1))
    summary, grid = _run(cfg, grid)
    assert (TRAIN_MESSAGE, 2) in grid.delivered and "train" not in [k for k, p in grid.delivered if p == 2]
    assert grid.delivered.index((FREEZE_MESSAGE, 2)) < grid.delivered.index((TRAIN_MESSAGE, 2))
    assert grid.delivered.count((TRAIN_MESSAGE, 2)) == 3 and grid.delivered.count((FREEZE_MESSAGE, 2)) == 1
    assert [(kind, partition) for kind, partition, _ in grid.errors] == [(TRAIN_MESSAGE, 1)]
    assert "FreezeMaskMissing" in grid.errors[0][2]
    client_1 = [kind for kind, partition in grid.delivered if partition == 1 and kind != "query.info"]
    assert client_1[-5:] == [FREEZE_MESSAGE, TRAIN_MESSAGE, TRAIN_MESSAGE, FREEZE_MESSAGE, TRAIN_MESSAGE]
    trained, final, trainable = _trainable(tmp_path)
    for name, keep in trainable.items():
        assert torch.equal(final[name][~keep], trained[name][~keep]), name
    assert summary["unlearn_exchange_bytes"][FREEZE_MESSAGE]["down"] > 0


@pytest.mark.parametrize("name", ["del", pytest.param("federaser", marks=pytest.mark.slow)])
def test_a_run_killed_in_its_unlearning_phase_and_resumed_ends_bit_identical(tmp_path, task_identity, runs, name):
    """Killed after the clients answered round 4 (the second unlearning round) and resumed with fresh nodes from the
    round-3 checkpoint: the freeze mask (values transport) or FedEraser's stored updates come back from the
    experiment's state, and the final model and scores are those of the uninterrupted run."""
    whole, _, whole_dir = runs(name)
    method, keys = CACHED_RUNS[name]
    cfg = _cfg(tmp_path, method, **keys)
    with pytest.raises(Stop):
        _run(cfg, RecordingGrid(cfg, 3, stop_after=4))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["rows"][-1]["round"] == 3
    resumed_cfg = {**cfg, "resume": True}
    resumed, grid = _run(resumed_cfg, RecordingGrid(resumed_cfg, 3))
    final, whole_final = torch.load(tmp_path / "final_model.pt"), torch.load(whole_dir / "final_model.pt")
    assert all(torch.equal(final[k], whole_final[k]) for k in whole_final)
    keys = ("forget_accuracy", "retain_accuracy", "test_accuracy_after", "mia_auc", "unlearn_rounds")
    assert {k: resumed[k] for k in keys} == {k: whole[k] for k in keys}
    assert not grid.errors and (TRAIN_MESSAGE, WITHDRAWN) not in grid.delivered
    if name == "del":  # the resumed server installs the freeze mask again before its round
        assert grid.delivered.index((FREEZE_MESSAGE, 1)) < grid.delivered.index((TRAIN_MESSAGE, 1))


# ------------------------------------------------------------------------------------------------ FedEraser


def test_federaser_calibration_takes_the_stored_norm_and_the_new_direction_per_tensor():
    from server.experiments.unlearning import calibrate, stored_rounds

    layout = sparse.Layout(("a",), ("b", "c"), {"a": (2,), "b": (1,), "c": (2,)})
    old = torch.tensor([3.0, 4.0, 2.0, 1.0, 1.0])  # a: norm 5, b: norm 2, c: norm sqrt 2
    new = torch.tensor([0.6, 0.8, -5.0, 0.0, 0.0])  # a: unit direction, b: direction -1, c: all zero
    assert torch.equal(calibrate(old, new, layout), torch.tensor([3.0, 4.0, -2.0, 0.0, 0.0]))
    doubled = torch.tensor([1.2, 1.6, -0.5, 3.0, 4.0])  # the new update's scale never matters
    assert torch.allclose(calibrate(old, doubled, layout), torch.tensor([3.0, 4.0, -2.0, 0.6 * 2**0.5,
                                                                         0.8 * 2**0.5]))
    with pytest.raises(ValueError):
        calibrate(old, new[:4], layout)
    assert stored_rounds(5, 2) == [1, 3, 5] and stored_rounds(4, 2) == [1, 3] and stored_rounds(3, 1) == [1, 2, 3]


def test_federaser_replays_the_stored_rounds_without_the_withdrawn_client(tmp_path, task_identity, monkeypatch):
    """train-rounds 3, interval 2: rounds 1 and 3 are stored (the two remaining clients' updates), the replay is 2
    calibration rounds from the initial model, on ceil(0.5 n) examples, and the withdrawn client is never asked."""
    seen = _tagged_examples(monkeypatch)
    cfg = _cfg(tmp_path, "federaser", run={"num-rounds": 5}, **{"train-rounds": 3, "federaser-interval": 2,
                                                                "federaser-epochs": 0.5})
    summary, grid = _run(cfg)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["experiment"]["federaser-updates"]
    assert sorted(saved) == [1, 3] and all(sorted(kept) == [1, 2] for kept in saved.values())
    total = sum(p.numel() for p in _mlp().parameters())
    assert summary["federaser_stored_bytes"] == 2 * 2 * 4 * total and summary["federaser_stored_rounds"] == 2
    unlearning = grid.delivered[grid.delivered.index((TRAIN_MESSAGE, 1)):]
    assert all(partition != WITHDRAWN for _, partition in unlearning)
    assert unlearning.count((TRAIN_MESSAGE, 1)) == 2 and unlearning.count((TRAIN_MESSAGE, 2)) == 2
    for partition in (1, 2):
        size = len(client_split(cfg, partition)[0])
        assert [len(trained_on) for trained_on in seen[partition]] == [math.ceil(0.5 * size)] * 2
    assert not grid.errors and summary["unlearn_rounds"] == 2 and 0.0 <= summary["mia_auc"] <= 1.0


def _scrambled_withdrawn_client(monkeypatch) -> None:
    """The withdrawn client's training data replaced by noise with random labels (the others unchanged)."""
    import client.handlers

    original = client.handlers.local_data

    def local_data(cfg, partition_id, split="train"):
        x, y = original(cfg, partition_id, split)
        if partition_id != WITHDRAWN:
            return x, y
        rng = np.random.default_rng(0)
        return rng.standard_normal(x.shape).astype(x.dtype), rng.integers(0, 10, len(y)).astype(y.dtype)

    monkeypatch.setattr(client.handlers, "local_data", local_data)


@pytest.mark.parametrize("method,independent", [("retrain", True), ("finetune", False)])
def test_retrain_never_sees_the_withdrawn_clients_data(tmp_path, task_identity, monkeypatch, runs, method,
                                                      independent):
    """The final model of retrain is bit-identical whatever the withdrawn client's data; finetune's is not (it
    starts from the model trained on it), which shows the scrambling reaches the runs."""
    plain, grid, plain_dir = runs(method)
    _scrambled_withdrawn_client(monkeypatch)
    _run(_cfg(tmp_path / "scrambled", method))
    first = torch.load(plain_dir / "final_model.pt")
    second = torch.load(tmp_path / "scrambled" / "final_model.pt")
    assert all(torch.equal(first[k], second[k]) for k in first) == independent
    assert (TRAIN_MESSAGE, WITHDRAWN) not in grid.delivered
    assert plain["phases"][1]["name"] == f"unlearn:{method}"


@pytest.mark.parametrize("setting,key", [({"num-rounds": 5}, "'num-rounds'"),
                                         ({"unlearn": {"client": 3}}, "'unlearn.client'"),
                                         ({"strategy": "ssfl"}, "'strategy'"),
                                         ({"unlearn": {"method": "federaser", "federaser-interval": 3}},
                                          "'unlearn.rounds'")])
def test_withdrawal_settings_are_refused_naming_the_key(setting, key):
    from server.experiments.unlearning import UnlearnExperiment

    keys = {"train-rounds": 2, "rounds": 2, **setting.pop("unlearn", {})}
    with pytest.raises(ConfigError, match=key):
        UnlearnExperiment.check_config(resolve({**RUN, **setting, "unlearn": keys}))


def test_the_preset_resolves_with_num_rounds_covering_both_phases():
    import tomllib

    from tests.conftest import REPO, SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.skip("needs ../shared/data")
    cfg = resolve(tomllib.loads((REPO / "simulations" / "presets" / "unlearn-federated.toml").read_text()))
    assert cfg["experiment"] == "unlearn" and cfg["num-rounds"] == cfg["unlearn.train-rounds"] + cfg["unlearn.rounds"]


@pytest.mark.slow
def test_fedsparse_run_of_a_withdrawal_on_ray(tmp_path):
    """The Flower simulation path: Ray clients, the DEL mask and freeze exchanges, the summary's entries."""
    import json

    from tests.conftest import fedsparse_run

    fedsparse_run(tmp_path / "run", "experiment=unlearn", "dataset=digits", "model=mlp", "num-clients=3",
                  "partitioner=iid", "num-rounds=3", "unlearn.train-rounds=2", "unlearn.rounds=1",
                  "unlearn.method=del")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["unlearn_rounds"] == 1 and summary["unlearn_exchange_bytes"][MASK_MESSAGE]["up"] > 0
    assert summary["del_mask_fraction"] == pytest.approx(0.3, abs=0.01) and 0 <= summary["mia_auc"] <= 1
