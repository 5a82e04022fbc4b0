"""Federated DEL with the forget set spread over clients (`unlearn.forget` = `uniform` / `class`): every client
holding forget examples sends DEL's unit scores (`query.unlearn_scores`), the server combines them by their
forget-size weighted mean and selects the top `unlearn.alpha` in whole channels (`mask_from_score_shares`, the one
selection the single-holder mask path runs too).

Checked: the weighted mean on a hand-computed case; one client's combined scores give exactly the mask the
single-holder path sends, bit for bit (mlp and cnn, several seeds); a federated run selects alpha of the
parameters in whole channels, from every holder's scores, and leaves every frozen parameter bit-identical; a
malformed score reply is rejected and logged and the others are used; none usable fails the run. Tiny digits runs
(3 in-process clients, the real ClientApp; `RecordingGrid` of `tests/test_unlearning_federated.py`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.handlers import HANDLERS, local_data
from client.unlearning import (
    FREEZE_MESSAGE,
    MASK_MESSAGE,
    SCORES_MESSAGE,
    TRAIN_MESSAGE,
    ScoreShare,
    client_parts,
    mask_from_score_shares,
    unit_shapes,
    unlearn_mask,
    unlearn_scores,
    unpack_parameter_mask,
)
from fedsparse.models import build_model
from fedsparse.unlearning.core import UnlearnConfig
from fedsparse.unlearning.localization import mask_fraction, select_top_fraction, weighted_mean_scores
from fedsparse.unlearning.methods.deletion_by_localization import del_mask, head_mask
from server.experiments.unlearning import UnlearnError, forget_counts, read_score_share
from tests.test_unlearning_federated import RecordingGrid, _cfg, _run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(name: str, seed: int) -> torch.nn.Module:
    return build_model(name, (1, 16, 16), 10, seed=seed)


def _query(model: torch.nn.Module, config: dict) -> RecordDict:
    return RecordDict({"model": ArrayRecord({k: v.clone() for k, v in model.state_dict().items()}),
                       "config": ConfigRecord(config)})


def _whole_channels(mask: dict, model: torch.nn.Module) -> bool:
    for name, p in model.named_parameters():
        if p.ndim > 1:
            rows = mask[name].reshape(p.shape[0], -1)
            if not bool((rows.all(dim=1) | ~rows.any(dim=1)).all()):
                return False
    return True


def test_weighted_mean_scores_on_a_hand_computed_case():
    first = {"w": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0])}
    second = {"w": torch.tensor([5.0, 0.0]), "b": torch.tensor([6.0])}
    combined = weighted_mean_scores([(first, 1.0), (second, 3.0)])  # (1 x first + 3 x second) / 4
    assert torch.equal(combined["w"], torch.tensor([4.0, 1.0], dtype=torch.float64))
    assert torch.equal(combined["b"], torch.tensor([5.0], dtype=torch.float64))
    # the top half of 2x3 + 1 = 7 parameters (target ceil(3.5) = 4): channel 0 (score 4, 3 entries) then b (5) first
    mask = select_top_fraction(combined, {"w": torch.Size([2, 3]), "b": torch.Size([1])}, 0.5)
    assert mask["b"].tolist() == [True] and mask["w"].tolist() == [[True] * 3, [False] * 3]
    alone = weighted_mean_scores([(first, 7.0)])
    assert all(torch.equal(alone[name], first[name].double()) for name in first)
    with pytest.raises(ValueError, match="weight"):
        weighted_mean_scores([(first, 0.0)])
    with pytest.raises(ValueError, match="same parameters"):
        weighted_mean_scores([(first, 1.0), ({"w": second["w"]}, 1.0)])


def test_the_combined_mask_weighs_each_clients_scores_by_its_forget_examples():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))  # 0.weight [2, 3] (2 channels), 0.bias [2]: 8 parameters
    many = ScoreShare({"0.weight": torch.tensor([1.0, 0.0]), "0.bias": torch.zeros(2)}, num_examples=5)
    few = ScoreShare({"0.weight": torch.tensor([0.0, 3.0]), "0.bias": torch.zeros(2)}, num_examples=1)
    # weighted: channel 0 scores 5/6, channel 1 3/6 -> the top quarter (2 entries) takes channel 0 whole;
    # an unweighted mean (1/2 vs 3/2) would take channel 1
    mask = mask_from_score_shares([many, few], model, 0.25)
    assert mask["0.weight"].tolist() == [[True] * 3, [False] * 3] and not mask["0.bias"].any()
    mask = mask_from_score_shares([dataclasses.replace(many, num_examples=1), few], model, 0.25)
    assert mask["0.weight"].tolist() == [[False] * 3, [True] * 3]


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_clients_combined_scores_give_the_holders_mask_bit_for_bit(tmp_path, model_name, seed):
    cfg = _cfg(tmp_path, "del", {"model": model_name, "seed": seed}, forget="client-samples",
               **{"forget-fraction": 0.5})
    model = _model(model_name, seed)
    holder_bits = unlearn_mask(_query(model, {"alpha": 0.3}), RecordDict(), cfg, 0)["mask"]["bits"].numpy()
    holder = unpack_parameter_mask(holder_bits, model)
    reply = unlearn_scores(_query(model, {"score-dtype": "float32"}), RecordDict(), cfg, 0)
    share = read_score_share(reply, model, "float32", forget_counts(cfg)[0])
    combined = mask_from_score_shares([share], model, 0.3)
    x, y = local_data(cfg, 0)
    _, forget = client_parts(cfg, 0, x, y)
    library = del_mask(model, forget, UnlearnConfig(batch_size=cfg["batch-size"], del_alpha=0.3))
    for name in holder:
        assert torch.equal(combined[name], holder[name]), name
        assert torch.equal(library[name], holder[name]), name  # the holder's mask is still the library's DEL mask
    assert len(reply["scores"]["scores"].numpy()) == sum(int(np.prod(s)) for s in unit_shapes(model).values())


def _spread_run(tmp_path, forget: str, model_name: str = "mlp", monkeypatch=None, tamper=None):
    keys = {"forget": forget, "forget-fraction": 0.3 if forget == "uniform" else 1.0, "forget-class": 3}
    cfg = _cfg(tmp_path, "del", {"model": model_name}, **keys)
    if tamper is not None:
        honest = HANDLERS[SCORES_MESSAGE]

        def tampered(content, state, run_cfg, partition_id):
            return tamper(honest(content, state, run_cfg, partition_id), partition_id)

        monkeypatch.setitem(HANDLERS, SCORES_MESSAGE, tampered)
    summary, grid = _run(cfg, RecordingGrid(cfg, cfg["num-clients"]))
    return cfg, summary, grid


def _expected_mask(cfg: dict, trained: dict, model: torch.nn.Module, partitions: list[int]) -> dict:
    """The mask the server should select from these partitions' honest scores of the trained model."""
    model.load_state_dict(trained)
    counts = forget_counts(cfg)
    shares = []
    for partition in partitions:
        reply = unlearn_scores(_query(model, {"score-dtype": "float32"}), RecordDict(), cfg, partition)
        shares.append(read_score_share(reply, model, "float32", counts[partition]))
    return mask_from_score_shares(shares, model, cfg["unlearn.alpha"])


@pytest.mark.parametrize("forget,model_name", [("uniform", "mlp"), ("class", "cnn")])
def test_del_over_several_holders_selects_alpha_in_whole_channels_and_freezes_the_rest(tmp_path, task_identity,
                                                                                        forget, model_name):
    cfg, summary, grid = _spread_run(tmp_path, forget, model_name)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["experiment"]
    trained, mask = saved["trained"], saved["mask"]
    final = torch.load(tmp_path / "final_model.pt")
    model = _model(model_name, cfg["seed"])
    total = sum(p.numel() for p in model.parameters())
    largest_row = max(int(np.prod(p.shape[1:])) for p in model.parameters() if p.ndim > 1)
    assert 0.3 <= mask_fraction(mask, model) < 0.3 + largest_row / total
    assert _whole_channels(mask, model)
    holders = [p for p, count in forget_counts(cfg).items() if count > 0]
    assert len(holders) >= 2  # the forget set is spread: the test would not test the combination otherwise
    assert sorted(p for kind, p in grid.delivered if kind == SCORES_MESSAGE) == holders
    assert (MASK_MESSAGE, 0) not in grid.delivered and not grid.errors
    expected = _expected_mask(cfg, trained, model, holders)
    assert all(torch.equal(mask[name], expected[name]) for name in mask)
    head = head_mask(model)
    for name, selected in mask.items():  # outside the mask and the head: bit-identical through the phase
        keep = selected | head.get(name, torch.zeros_like(selected))
        assert torch.equal(final[name][~keep], trained[name][~keep]), name
        if selected.any():  # reset to a fresh initialisation (and trained): the selected entries moved
            assert bool((final[name][selected] != trained[name][selected]).any()), name
    assert sum(1 for kind, _ in grid.delivered if kind == FREEZE_MESSAGE) == cfg["num-clients"]
    assert sum(1 for kind, _ in grid.delivered if kind == TRAIN_MESSAGE) == 2 * cfg["num-clients"]
    up = summary["unlearn_exchange_bytes"][SCORES_MESSAGE]["up"]
    assert up >= 4 * len(holders) * sum(int(np.prod(s)) for s in unit_shapes(model).values())
    assert summary["unlearn_oneoff_bytes"] >= up


def _wrong_length(reply: RecordDict) -> RecordDict:
    reply["scores"] = ArrayRecord({"scores": Array(reply["scores"]["scores"].numpy()[:-1].copy())})
    return reply


def _not_finite(reply: RecordDict) -> RecordDict:
    flat = reply["scores"]["scores"].numpy().copy()
    flat[3] = np.nan
    reply["scores"] = ArrayRecord({"scores": Array(flat)})
    return reply


def _wrong_dtype(reply: RecordDict) -> RecordDict:
    reply["scores"] = ArrayRecord({"scores": Array(reply["scores"]["scores"].numpy().astype(np.float64))})
    return reply


def _inflated_count(reply: RecordDict) -> RecordDict:
    reply["metrics"] = MetricRecord({"num-examples": int(reply["metrics"]["num-examples"]) * 10})
    return reply


@pytest.mark.parametrize("spoil,reason", [(_wrong_length, "unit scores, got shape"), (_not_finite, "not finite"),
                                          (_wrong_dtype, "dtype float64"), (_inflated_count, "claims")])
def test_read_score_share_rejects_a_malformed_reply(tmp_path, spoil, reason):
    cfg = _cfg(tmp_path, "del", forget="uniform", **{"forget-fraction": 0.3})
    model = _model("mlp", 0)
    reply = unlearn_scores(_query(model, {"score-dtype": "float32"}), RecordDict(), cfg, 1)
    count = forget_counts(cfg)[1]
    assert read_score_share(reply, model, "float32", count).num_examples == count
    with pytest.raises(ValueError, match=reason):
        read_score_share(spoil(reply), model, "float32", count)


def test_a_malformed_score_reply_is_rejected_and_logged_and_the_others_are_used(tmp_path, task_identity, monkeypatch,
                                                                                 caplog):
    spoilers = {1: _wrong_length, 2: _not_finite}
    caplog.set_level(logging.WARNING, logger="fedsparse")
    cfg, summary, _grid = _spread_run(tmp_path, "uniform", monkeypatch=monkeypatch,
                                     tamper=lambda reply, p: spoilers[p](reply) if p in spoilers else reply)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["experiment"]
    expected = _expected_mask(cfg, saved["trained"], _model("mlp", cfg["seed"]), [0])
    assert all(torch.equal(saved["mask"][name], expected[name]) for name in expected)
    rejected = [r.getMessage() for r in caplog.records if "rejected the localization scores" in r.getMessage()]
    assert len(rejected) == 2 and "partition 1" in rejected[0] and "partition 2" in rejected[1]
    assert summary["phases"][1]["name"] == "unlearn:del" and summary["unlearn_rounds"] == 2


def test_no_usable_score_reply_fails_the_run_with_the_reason(tmp_path, task_identity, monkeypatch):
    with pytest.raises(UnlearnError, match="none of the 3 clients holding forget examples"):
        _spread_run(tmp_path, "uniform", monkeypatch=monkeypatch, tamper=lambda reply, p: _wrong_dtype(reply))


def test_float16_scores_select_nearly_the_float32_mask(tmp_path):
    cfg = _cfg(tmp_path, "del", forget="uniform", **{"forget-fraction": 0.3})
    model = _model("mlp", 0)
    masks = {}
    for dtype in ("float32", "float16"):
        shares = [read_score_share(unlearn_scores(_query(model, {"score-dtype": dtype}), RecordDict(), cfg, p),
                                   model, dtype, forget_counts(cfg)[p]) for p in range(3)]
        masks[dtype] = mask_from_score_shares(shares, model, 0.3)
    both = sum(int((masks["float32"][n] & masks["float16"][n]).sum()) for n in masks["float32"])
    either = sum(int((masks["float32"][n] | masks["float16"][n]).sum()) for n in masks["float32"])
    assert both / either > 0.95
