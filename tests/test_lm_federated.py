"""The char GPT as federated rounds: the lm experiment (`server.experiments.language`) and its client handler
(`client.language`).

In-process runs use `server.local_grid.LocalGrid` (the real ClientApp on in-process nodes) and a tiny GPT so every
test takes seconds; one slow test runs the preset through `fedsparse run` with real Ray.
"""

from __future__ import annotations

import math

import pytest
import torch

import client.language
from client.language import client_text, lm_corpus
from fedsparse.config import ConfigError, resolve
from fedsparse.lm.train import evaluate
from server.local_grid import LocalGrid
from tests.conftest import fedsparse_run, summary

pytestmark = pytest.mark.usefixtures("one_torch_thread", "task_identity")

TINY = {"block-size": 16, "layers": 1, "heads": 2, "embd": 16, "local-steps": 8, "eval-windows": 32,
        "sample-chars": 20}


def _cfg(out, seed: int = 0, **settings: object) -> dict:
    return resolve({"experiment": "lm", "num-clients": 3, "num-rounds": 1, "lr": 0.01, "grad-clip": 1.0,
                    "batch-size": 16, "seed": seed, "output-dir": str(out), "lm": dict(TINY), **settings})


def test_clients_hold_disjoint_speakers_that_tile_the_training_text(tmp_path):
    cfg = _cfg(tmp_path, **{"num-clients": 5})
    corpus = lm_corpus(cfg)
    speakers = [set(s) for s in corpus.partition.client_speakers]
    assert all(speakers) and sum(len(s) for s in speakers) == len(set().union(*speakers))
    assert sum(len(client_text(cfg, c)) for c in range(5)) == len(corpus.train)
    assert corpus.train + corpus.val == corpus.text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_federated_round_lowers_the_validation_loss_of_an_untrained_gpt(tmp_path, seed):
    from server.experiments.language import LanguageExperiment
    from server.loop import run_federation

    cfg = _cfg(tmp_path, seed)
    before = evaluate(LanguageExperiment(cfg).model, LanguageExperiment(cfg).val_stream, max_windows=32).loss
    result = run_federation(LocalGrid(cfg), cfg)
    assert before > math.log(60)  # an untrained GPT is near uniform over the ~65 characters
    assert result["val_loss"] < before - 0.4  # 5 seeds here: drops of 0.61-0.65
    assert set(result["samples"]) == {"prompt", "greedy", "temperature_0.8"}


def test_a_client_trains_only_on_its_own_text(tmp_path, monkeypatch):
    from server.loop import run_federation

    cfg = _cfg(tmp_path)
    streams: list[torch.Tensor] = []
    original = client.language.train_lm

    def recording(model, stream, settings, *args, **kwargs):
        streams.append(stream.clone())
        return original(model, stream, settings, *args, **kwargs)

    monkeypatch.setattr(client.language, "train_lm", recording)
    grid = LocalGrid(cfg)
    run_federation(grid, cfg)
    trained = [partition for kind, partition in grid.delivered if kind == "train.lm"]
    assert sorted(trained) == [0, 1, 2] and len(streams) == 3
    tokenizer = lm_corpus(cfg).tokenizer
    for partition, stream in zip(trained, streams, strict=True):
        assert torch.equal(stream, tokenizer.encode_tensor(client_text(cfg, partition)))


@pytest.mark.parametrize(("settings", "key"), [
    ({"strategy": "ssfl"}, "strategy"),
    ({"lm": {**TINY, "heads": 3}}, "lm.heads"),
    ({"num-clients": 5000}, "num-clients"),
])
def test_config_errors_name_the_key(tmp_path, settings, key):
    from fedsparse.simulation import check_run_settings

    with pytest.raises(ConfigError, match=f"'{key}'"):
        check_run_settings(_cfg(tmp_path, **settings))


@pytest.mark.slow
def test_the_preset_runs_on_ray(tmp_path):
    fedsparse_run(tmp_path, "num-rounds=2", "lm.local-steps=5", "lm.eval-windows=8", extra=("--preset", "lm-train"))
    result = summary(tmp_path)
    assert result["rounds"] == 2 and math.isfinite(result["val_loss"]) and result["val_loss"] < math.log(60)
