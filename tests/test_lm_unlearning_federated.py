"""LM unlearning as federated rounds: the lm-unlearn experiment (`server.experiments.language_unlearning`) and its
client handler (`client.language_unlearning`).

The memorization measure itself (a sequence trained 100 times is extracted, an unseen one is not) is tested on the
library in tests/test_lm.py (`test_sequence_trained_100_times_is_extracted_and_unseen_is_not`); here the federated
pieces. In-process runs use `server.local_grid.LocalGrid` and a tiny GPT; one slow test runs the preset on Ray.
"""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord

import client.language_unlearning
from client.language import client_text, lm_corpus
from client.language_unlearning import lm_forget_set
from fedsparse.config import ConfigError, resolve
from fedsparse.lm.memorization import CANARY_KINDS, make_canaries
from server.local_grid import LocalGrid
from tests.conftest import fedsparse_run, summary

pytestmark = pytest.mark.usefixtures("one_torch_thread", "task_identity")

TINY = {"block-size": 32, "layers": 1, "heads": 2, "embd": 16, "local-steps": 4, "eval-windows": 16,
        "sample-chars": 0}
FORGET = {"count": 8, "length": 32, "prefix": 8, "repeats": 5, "train-rounds": 1, "rounds": 1}


def _cfg(out, seed: int = 0, lmu: dict | None = None, **settings: object) -> dict:
    return resolve({"experiment": "lm-unlearn", "num-clients": 3, "lr": 0.01, "grad-clip": 1.0, "batch-size": 16,
                    "seed": seed, "output-dir": str(out), "lm": dict(TINY), "lmu": {**FORGET, **(lmu or {})},
                    **settings})


@pytest.mark.parametrize("forget", ["id", "ood"])
def test_the_forget_set_is_only_in_the_forgetting_clients_full_text(tmp_path, forget):
    cfg = _cfg(tmp_path, lmu={"forget": forget, "client": 1})
    forget_set = lm_forget_set(cfg)
    examples, twins = forget_set.forget.examples, forget_set.forget.holdout
    assert len(examples) == len(twins) == 8 and not set(examples) & set(twins)
    assert all(len(e) == 32 for e in examples + twins)
    copies = 1 if forget == "id" else 5  # an ID passage opens one turn; a canary is inserted `repeats` times
    assert all(forget_set.full_text.count(e) >= copies for e in examples)
    assert not any(e in forget_set.retain_text for e in examples)
    others = [client_text(cfg, c) for c in (0, 2)]
    for twin in twins:  # no client ever trains on a twin
        assert twin not in forget_set.full_text and not any(twin in text for text in others)


def test_the_tokenizer_holds_every_canary_kind(tmp_path):
    tokenizer = lm_corpus(_cfg(tmp_path)).tokenizer
    for kind in CANARY_KINDS:
        for canary in make_canaries(kind, 20, 32, seed=3):
            assert tokenizer.decode(tokenizer.encode_tensor(canary)) == canary


def _record_training(monkeypatch) -> list[tuple[str, str]]:
    """(kind, text) of every local training call: ("descend", text) or ("ascend", joined forget examples)."""
    calls: list[tuple[str, str]] = []
    descend, ascend = client.language_unlearning.local_steps, client.language_unlearning.ascend

    def recording_descend(model, text, *args, **kwargs):
        calls.append(("descend", text))
        return descend(model, text, *args, **kwargs)

    def recording_ascend(model, tokenizer, examples, *args, **kwargs):
        calls.append(("ascend", "\n".join(examples)))
        return ascend(model, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(client.language_unlearning, "local_steps", recording_descend)
    monkeypatch.setattr(client.language_unlearning, "ascend", recording_ascend)
    return calls


def test_retrain_starts_from_the_initial_model_and_never_trains_on_the_forget_set(tmp_path, monkeypatch):
    from server.experiments.language_unlearning import LMUnlearnExperiment
    from server.loop import run_federation

    cfg = _cfg(tmp_path, lmu={"method": "retrain", "forget": "ood"})
    experiment = LMUnlearnExperiment(cfg)
    ctx = SimpleNamespace(arrays=ArrayRecord({k: torch.zeros_like(v) for k, v in experiment.initial.items()}))
    experiment.on_start(ctx)
    initial = experiment.model.state_dict()
    assert all(torch.equal(ctx.arrays.to_torch_state_dict()[k], v) for k, v in initial.items())

    calls = _record_training(monkeypatch)
    grid = LocalGrid(cfg)
    result = run_federation(grid, cfg)
    examples = lm_forget_set(cfg).forget.examples
    trained = [partition for kind, partition in grid.delivered if kind == "train.lmu"]
    assert trained == [0, 1, 2, 0, 1, 2] and len(calls) == 6
    assert all(kind == "descend" for kind, _ in calls)
    phase1, phase2 = calls[:3], calls[3:]
    assert all(e in phase1[0][1] for e in examples)  # the instrument sees the forget set where it is trained on
    assert not any(e in text for _, text in phase2 for e in examples)
    assert result["lmu_method"] == "retrain" and result["unlearn_rounds"] == 1 and result["unlearn_bytes"] > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_ascent_raises_the_forget_loss_in_one_round(tmp_path, seed, monkeypatch):
    from server.loop import run_federation

    cfg = _cfg(tmp_path, seed, lmu={"method": "gradient_ascent", "participants": "client", "ascent-lr": 1e-2})
    calls = _record_training(monkeypatch)
    grid = LocalGrid(cfg)
    result = run_federation(grid, cfg)
    assert [p for kind, p in grid.delivered if kind == "train.lmu"] == [0, 1, 2, 0]  # phase 2: client 0 alone
    assert calls[-1] == ("ascend", "\n".join(lm_forget_set(cfg).forget.examples))
    with open(tmp_path / "lmu_trace.csv", newline="") as handle:
        trace = list(csv.DictReader(handle))
    assert [int(t["round"]) for t in trace] == [0, 1]
    before, after = float(trace[0]["loss/forget"]), float(trace[1]["loss/forget"])
    assert after > before + 0.3  # seeds 0-3: +0.61 to +0.93 nats
    assert result["before"]["loss/forget"] == pytest.approx(before)
    assert int(trace[1]["bytes"]) == result["unlearn_bytes"] > 0
    assert (tmp_path / "lmu_trace.png").exists()


def test_finetune_without_the_client_sends_it_nothing(tmp_path):
    from server.loop import run_federation

    cfg = _cfg(tmp_path, lmu={"method": "finetune", "participants": "others", "client": 2})
    grid = LocalGrid(cfg)
    result = run_federation(grid, cfg)
    assert [p for kind, p in grid.delivered if kind == "train.lmu"] == [0, 1, 2, 0, 1]
    assert math.isfinite(result["after"]["ppl/val"])


@pytest.mark.parametrize(("settings", "key"), [
    ({"lmu": {"client": 3}}, "lmu.client"),
    ({"lmu": {"length": 40}}, "lmu.length"),
    ({"lmu": {"prefix": 32}}, "lmu.prefix"),
    ({"lmu": {"method": "gradient_ascent", "participants": "others"}}, "lmu.participants"),
    ({"lmu": {"method": "finetune", "participants": "client"}}, "lmu.participants"),
    ({"lmu": {"forget": "id", "count": 100_000}}, "lmu.count"),
    ({"strategy": "ssfl"}, "strategy"),
])
def test_config_errors_name_the_key(tmp_path, settings, key):
    from fedsparse.simulation import check_run_settings

    with pytest.raises(ConfigError, match=f"'{key}'"):
        check_run_settings(_cfg(tmp_path, lmu=settings.get("lmu"),
                                **{k: v for k, v in settings.items() if k != "lmu"}))


def test_an_unknown_method_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="lmu.method"):
        _cfg(tmp_path, lmu={"method": "forget_everything"})


@pytest.mark.slow
def test_the_preset_runs_on_ray(tmp_path):
    fedsparse_run(tmp_path, "lmu.train-rounds=1", "lmu.rounds=1", "num-rounds=2", "lm.local-steps=3",
                  "lm.eval-windows=8", "lmu.repeats=3", extra=("--preset", "lm-unlearn"))
    result = summary(tmp_path)
    assert result["rounds"] == 2 and result["unlearn_rounds"] == 1 and result["lmu_method"] == "gradient_ascent"
    assert math.isfinite(result["after"]["ppl/val"]) and (tmp_path / "lmu_trace.csv").exists()
