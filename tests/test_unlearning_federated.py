"""Client withdrawal as federated rounds: the unlearn experiment (`server.experiments.unlearning`) and its client
handlers (`client.unlearning`).

Runs use the offline `digits` dataset, a small MLP and 3 in-process clients running the real ClientApp
(`RecordingGrid`): 2 FedAvg rounds on all, then 2 unlearning rounds without client 0. The library-level checks of
DEL (localization, reset, freeze mode) are in the unlearning library's own tests.
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
    pack_parameter_mask,
    unlearn_mask,
    unpack_parameter_mask,
)
from fedsparse.config import ConfigError, resolve
from fedsparse.models import build_model
from fedsparse.unlearning.localization import mask_fraction
from fedsparse.unlearning.methods.deletion_by_localization import head_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WITHDRAWN = 0
RUN = {"experiment": "unlearn", "dataset": "digits", "model": "mlp", "num-clients": 3, "partitioner": "iid",
       "local-epochs": 1, "batch-size": 16, "lr": 0.05, "momentum": 0.5, "seed": 3, "num-rounds": 4}


def _cfg(out, method: str, **unlearn: object) -> dict:
    keys = {"method": method, "client": WITHDRAWN, "train-rounds": 2, "rounds": 2, **unlearn}
    return resolve({**RUN, "output-dir": str(out), "unlearn": keys})


class RecordingGrid:
    """In-process nodes (node id 100 + partition) running the real ClientApp, each with its own Context; records
    every (message type, partition) it delivers."""

    def __init__(self, cfg: dict, num_nodes: int) -> None:
        from flwr.app import Context

        from client.client_app import build_app

        self.app = build_app()
        self.contexts = {100 + p: Context(run_id=1, node_id=100 + p, state=RecordDict(), run_config=cfg,
                                          node_config={"partition-id": p, "num-partitions": num_nodes})
                         for p in range(num_nodes)}
        self.delivered: list[tuple[str, int]] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        answers = []
        for message in messages:
            self.delivered.append((message.metadata.message_type, message.metadata.dst_node_id - 100))
            try:
                answers.append(self.app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as err:  # noqa: BLE001  (as Flower: a client exception is an error reply)
                answers.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message))
        return answers


def _run(cfg: dict) -> tuple[dict, RecordingGrid]:
    from server.loop import run_federation

    grid = RecordingGrid(cfg, cfg["num-clients"])
    return run_federation(grid, cfg), grid


def _mlp() -> torch.nn.Module:
    return build_model("mlp", (1, 16, 16), 10, seed=0)


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


def test_federated_del_changes_only_the_mask_and_head_never_trains_the_withdrawn_client(tmp_path, task_identity):
    cfg = _cfg(tmp_path / "del", "del")
    summary, grid = _run(cfg)
    saved = torch.load(tmp_path / "del" / "checkpoint.pt", weights_only=False)["experiment"]
    trained, mask = saved["trained"], saved["mask"]
    final = torch.load(tmp_path / "del" / "final_model.pt")
    model = _mlp()
    trainable = {name: mask[name] | head_mask(model).get(name, torch.zeros_like(mask[name])) for name in mask}
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
    # the mask record's bytes are one-off traffic: exactly what a finetune run (same discovery) does not spend
    exchange = summary["unlearn_exchange_bytes"]
    total = sum(p.numel() for p in model.parameters())
    assert exchange[MASK_MESSAGE]["up"] >= math.ceil(total / 8)
    finetune, _ = _run(_cfg(tmp_path / "finetune", "finetune"))
    assert summary["bytes_oneoff"] - finetune["bytes_oneoff"] == summary["unlearn_oneoff_bytes"] == sum(
        counted["down"] + counted["up"] for counted in exchange.values())
    # the rounds cost what finetune's do, but for the freeze fingerprint (16 characters, not "none") in 4 messages
    assert summary["unlearn_rounds"] == 2
    assert summary["unlearn_round_bytes"] - finetune["unlearn_round_bytes"] == 4 * (16 - len(NO_FREEZE))
    assert 0.0 <= summary["mia_auc"] <= 1.0 and summary["phases"][1]["name"] == "unlearn:del"


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
def test_retrain_never_sees_the_withdrawn_clients_data(tmp_path, task_identity, monkeypatch, method, independent):
    """The final model of retrain is bit-identical whatever the withdrawn client's data; finetune's is not (it
    starts from the model trained on it), which shows the scrambling reaches the runs."""
    plain, grid = _run(_cfg(tmp_path / "plain", method))
    _scrambled_withdrawn_client(monkeypatch)
    _run(_cfg(tmp_path / "scrambled", method))
    first = torch.load(tmp_path / "plain" / "final_model.pt")
    second = torch.load(tmp_path / "scrambled" / "final_model.pt")
    assert all(torch.equal(first[k], second[k]) for k in first) == independent
    assert (TRAIN_MESSAGE, WITHDRAWN) not in grid.delivered
    assert plain["phases"][1]["name"] == f"unlearn:{method}"


@pytest.mark.parametrize("setting,key", [({"num-rounds": 5}, "'num-rounds'"),
                                         ({"unlearn": {"client": 3}}, "'unlearn.client'"),
                                         ({"strategy": "ssfl"}, "'strategy'")])
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
