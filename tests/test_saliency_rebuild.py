"""`sparse.saliency-init = "rebuild"`: the saliency query carries only the fingerprint of the server's initial
model; each client rebuilds the seeded model itself. Checked end to end on the real ClientApp (LocalGrid): the run
ends with the model of `send` bit for bit, the query's down bytes shrink to a few hundred per client, and a client
whose rebuild differs gets the model sent instead (the run still ends with the same model)."""

from __future__ import annotations

import json

import pytest
import torch

import client.handlers
from fedsparse import sparse, transport
from fedsparse.config import ConfigError, resolve
from fedsparse.models import build_model
from server.local_grid import LocalGrid
from server.loop import run_federation

SETTINGS = {"strategy": "ssfl", "dataset": "digits", "model": "cnn", "num-clients": 3, "num-rounds": 1,
            "partitioner": "iid", "local-epochs": 1, "batch-size": 32, "lr": 0.05, "seed": 7, "sparsity": 0.9}


class SaliencyBytes(LocalGrid):
    """LocalGrid that sums the serialized bytes of the query.saliency messages it delivers."""

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.saliency_down = 0
        self.saliency_messages = 0

    def deliver(self, message):
        if message.metadata.message_type == "query.saliency":
            self.saliency_down += transport.content_bytes(message.content)
            self.saliency_messages += 1
        return super().deliver(message)


def run(tmp_path, name: str, **overrides) -> tuple[dict, dict, SaliencyBytes]:
    cfg = resolve({**SETTINGS, **overrides, "output-dir": str(tmp_path / name)})
    grid = SaliencyBytes(cfg)
    summary = run_federation(grid, cfg)
    return summary, torch.load(tmp_path / name / "final_model.pt"), grid


@pytest.fixture(scope="module")
def sent(tmp_path_factory) -> tuple[dict, dict, SaliencyBytes]:
    """The run with the model sent (the default)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield run(tmp_path_factory.mktemp("sent"), "send")
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def test_rebuilt_init_gives_the_same_run_for_a_few_hundred_bytes(task_identity, tmp_path, sent):
    sent_summary, sent_model, sent_grid = sent
    rebuilt_summary, rebuilt_model, rebuilt_grid = run(tmp_path, "rebuild", **{"sparse.saliency-init": "rebuild"})
    assert sparse.state_fingerprint(rebuilt_model) == sparse.state_fingerprint(sent_model)
    assert rebuilt_summary["final_accuracy"] == sent_summary["final_accuracy"]
    assert sent_grid.saliency_messages == rebuilt_grid.saliency_messages == 3
    model_bytes = sum(t.numel() * 4 for t in build_model("cnn", (1, 8, 8), 10).state_dict().values())
    assert sent_grid.saliency_down > 3 * model_bytes
    assert rebuilt_grid.saliency_down < 3 * 1000
    assert rebuilt_summary["oneoff_down"] == sent_summary["oneoff_down"] - sent_grid.saliency_down + rebuilt_grid.saliency_down
    assert rebuilt_summary["oneoff_up"] == sent_summary["oneoff_up"]  # the same scores


def test_a_client_whose_rebuild_differs_is_sent_the_model(task_identity, tmp_path, monkeypatch, sent):
    _, sent_model, _ = sent

    def other_seed(name, input_shape, num_classes, seed=None, width=1):
        return build_model(name, input_shape, num_classes, seed=None if seed is None else seed + 1, width=width)

    monkeypatch.setattr(client.handlers, "build_model", other_seed)
    _, model, grid = run(tmp_path, "rebuild", **{"sparse.saliency-init": "rebuild"})
    assert sparse.state_fingerprint(model) == sparse.state_fingerprint(sent_model)
    assert grid.saliency_messages == 6  # 3 fingerprint-only queries, then 3 with the model
    failures = json.loads((tmp_path / "rebuild" / "summary.json").read_text())["failures"]
    assert len(failures) == 3 and all("InitMismatch" in f["reason"] for f in failures)


def test_an_unknown_saliency_init_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="saliency-init"):
        resolve({**SETTINGS, "sparse.saliency-init": "guess"})
