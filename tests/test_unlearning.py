"""Unlearning methods and localization (fedsparse.unlearning): the registry, freeze masks, DEL's mask and reset,
random labels, gradient ascent. Tiny CNN on scikit-learn's 8x8 digits; the whole file runs in seconds."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedsparse.models import build_model
from fedsparse.unlearning import UNLEARNING_METHODS, ArrayData, UnlearnConfig, unlearn
from fedsparse.unlearning.core import fresh_initialisation, head_names
from fedsparse.unlearning.evaluate import cross_entropy_per_example, predict_logits
from fedsparse.unlearning.localization import (
    channel_scores,
    localization_scores,
    localize,
    mask_fraction,
    reset_masked,
    select_top_fraction,
)
from fedsparse.unlearning.methods.deletion_by_localization import del_mask, head_mask
from fedsparse.unlearning.methods.finetune import finetune
from fedsparse.unlearning.methods.random_label import random_other_labels

FAST = UnlearnConfig(epochs=1, retrain_epochs=1, batch_size=64, lr=0.02)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def digits() -> tuple[ArrayData, ArrayData, ArrayData]:
    """(retain, forget, test) from the 8x8 digits: 540 / 60 / 300 examples."""
    raw = load_digits()
    x = (raw.images / 16).astype(np.float32)[:, None]
    y = raw.target.astype(np.int64)
    return ArrayData(x[60:600], y[60:600]), ArrayData(x[:60], y[:60]), ArrayData(x[1000:1300], y[1000:1300])


@pytest.fixture(scope="module")
def trained(digits) -> torch.nn.Module:
    """A cnn trained on retain + forget (the 'original' model)."""
    retain, forget, _ = digits
    everything = ArrayData(np.concatenate([retain.x, forget.x]), np.concatenate([retain.y, forget.y]))
    return finetune(build_model("cnn", (1, 8, 8), 10, seed=0), everything, forget,
                    UnlearnConfig(epochs=15, lr=0.1, seed=0))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", sorted(UNLEARNING_METHODS))
def test_every_method_returns_same_architecture_and_leaves_the_original_alone(method, digits, trained):
    retain, forget, _ = digits
    before = state(trained)
    out = unlearn(method, trained, retain, forget, FAST)
    assert type(out) is type(trained) and out is not trained
    after = out.state_dict()
    assert list(after) == list(before)
    assert all(after[k].shape == before[k].shape for k in before)
    assert all(torch.equal(trained.state_dict()[k], before[k]) for k in before), "the input model was modified"
    assert any(not torch.equal(after[k], before[k]) for k in before), "the method changed nothing"
    assert np.isfinite(predict_logits(out, forget)).all()


def test_unknown_method_and_bad_config_raise():
    with pytest.raises(ValueError, match="unknown unlearning method 'nope'"):
        unlearn("nope", torch.nn.Linear(2, 2), None, None, FAST)
    with pytest.raises(ValueError, match="del_alpha"):
        UnlearnConfig(del_alpha=0)
    with pytest.raises(ValueError, match="epochs"):
        UnlearnConfig(epochs=0)
    with pytest.raises(ValueError, match="int64"):
        ArrayData(np.zeros((2, 1), np.float32), np.zeros(2, np.int32))


def test_select_top_fraction_hand_computed_rounding():
    # "w": 3 channels of 2 entries, channel scores 1, 5, 3; "b": per-entry scores 4, 0, 2. P = 9 parameters.
    scores = {"w": torch.tensor([1.0, 5.0, 3.0]), "b": torch.tensor([4.0, 0.0, 2.0])}
    shapes = {"w": torch.Size([3, 2]), "b": torch.Size([3])}
    # fraction 0.5: target ceil(4.5) = 5; units by score: w[1] (2 entries), b[0] (1), w[2] (2) -> exactly 5.
    mask = select_top_fraction(scores, shapes, 0.5)
    assert mask["w"].tolist() == [[False, False], [True, True], [True, True]]
    assert mask["b"].tolist() == [True, False, False]
    # fraction 0.4: target ceil(3.6) = 4; the channel w[2] straddles the cut and is taken whole: 5 = 4 + 1.
    mask = select_top_fraction(scores, shapes, 0.4)
    assert sum(int(m.sum()) for m in mask.values()) == 5
    assert mask["w"][2].all()
    # fraction 1: everything.
    assert all(m.all() for m in select_top_fraction(scores, shapes, 1.0).values())


def test_channel_score_is_mean_of_top_k_of_the_row():
    s = torch.arange(30, dtype=torch.float32).reshape(10, 3)  # row i = [3i, 3i+1, 3i+2]
    assert torch.equal(channel_scores({"w": s}, 0.1)["w"], s[:, 2])  # k = int(0.1 * 10) = 1: the row maximum
    assert torch.allclose(channel_scores({"w": s}, 0.2)["w"], s[:, 1:].mean(1))  # k = 2
    small = torch.tensor([[1.0, 9.0], [4.0, 2.0]])  # 2 rows: int(0.1 * 2) = 0, we take k = 1
    assert torch.equal(channel_scores({"w": small}, 0.1)["w"], torch.tensor([9.0, 4.0]))
    bias = torch.tensor([3.0, 1.0])
    assert torch.equal(channel_scores({"b": bias}, 0.1)["b"], bias)


def test_weighted_grad_scores_are_theta_times_summed_gradient_of_negated_loss(digits, trained):
    _, forget, _ = digits
    scores = localization_scores(trained, forget, criterion="weighted_grad", batch_size=25)  # batches 25, 25, 10
    model = copy.deepcopy(trained).eval()
    total = None
    for start in (0, 25, 50):
        xb = torch.from_numpy(forget.x[start:start + 25])
        yb = torch.from_numpy(forget.y[start:start + 25])
        grads = torch.autograd.grad(-torch.nn.functional.cross_entropy(model(xb), yb), list(model.parameters()))
        total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
    for (name, p), g in zip(model.named_parameters(), total, strict=True):
        assert torch.allclose(scores[name], (p.detach() * g).abs(), rtol=1e-5, atol=1e-8), name


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5])
def test_del_mask_has_alpha_of_the_parameters_in_whole_channels(alpha, digits, trained):
    _, forget, _ = digits
    mask = del_mask(trained, forget, dataclasses.replace(FAST, del_alpha=alpha))
    params = dict(trained.named_parameters())
    total = sum(p.numel() for p in params.values())
    target = math.ceil(alpha * total)
    largest_channel = max(p[0].numel() for p in params.values() if p.ndim > 1)
    selected = sum(int(m.sum()) for m in mask.values())
    assert target <= selected <= target + largest_channel - 1
    assert mask_fraction(mask, trained) == pytest.approx(selected / total)
    for name, m in mask.items():
        if m.ndim > 1:
            rows = m.reshape(m.shape[0], -1)
            assert torch.equal(rows.all(1), rows.any(1)), f"{name}: a channel is partly selected"


def test_reset_masked_takes_fresh_values_inside_and_keeps_the_rest(trained):
    model = copy.deepcopy(trained)
    fresh = fresh_initialisation(model, seed=3)
    mask = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.3
            for name, p in model.named_parameters()}
    reset_masked(model, mask, fresh)
    original, fresh_params = dict(trained.named_parameters()), dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        m = mask[name]
        assert torch.equal(p[m], fresh_params[name][m]) and torch.equal(p[~m], original[name][~m])
        assert (p[m] != original[name][m]).all()


def test_del_changes_only_the_reset_channels_and_the_head_bit_exactly(digits, trained):
    retain, forget, _ = digits
    cfg = dataclasses.replace(FAST, epochs=2, weight_decay=1e-3)
    mask = del_mask(trained, forget, cfg)
    out = unlearn("del", trained, retain, forget, cfg)
    head = set(head_names(trained))
    assert head == {"3.weight", "3.bias"}
    original, after = dict(trained.named_parameters()), dict(out.named_parameters())
    changed_inside = 0
    for name, p in original.items():
        q = after[name].detach()
        if name in head:
            continue
        m = mask[name]
        assert torch.equal(q[~m], p.detach()[~m]), f"{name}: a weight outside the DEL mask moved"
        assert (q[m] != p.detach()[m]).all(), f"{name}: a reset weight still has its original value"
        changed_inside += int(m.sum())
    assert changed_inside > 0
    assert not torch.equal(after["3.weight"], original["3.weight"])


def test_freeze_mask_keeps_outside_weights_bit_exact_under_momentum_and_weight_decay(digits, trained):
    retain, forget, _ = digits
    generator = torch.Generator().manual_seed(5)
    mask = {name: torch.rand(p.shape, generator=generator) < 0.2 for name, p in trained.named_parameters()}
    del mask["1.weight"]  # absent from the mask: frozen whole
    cfg = dataclasses.replace(FAST, epochs=2, momentum=0.9, weight_decay=0.05, mask=mask)
    for method in ("finetune", "neggrad_plus", "scrub", "random_label"):
        out = dict(unlearn(method, trained, retain, forget, cfg).named_parameters())
        for name, p in trained.named_parameters():
            m = mask.get(name, torch.zeros_like(p, dtype=torch.bool))
            assert torch.equal(out[name].detach()[~m], p.detach()[~m]), f"{method}: {name} moved outside the mask"
        assert any(not torch.equal(out[n].detach(), p.detach()) for n, p in trained.named_parameters())


def test_salun_changes_only_its_saliency_mask(digits, trained):
    retain, forget, _ = digits
    cfg = dataclasses.replace(FAST, salun_fraction=0.25)
    mask = localize(trained, forget, fraction=0.25, criterion="grad", granularity="param", batch_size=cfg.batch_size)
    out = dict(unlearn("salun", trained, retain, forget, cfg).named_parameters())
    for name, p in trained.named_parameters():
        assert torch.equal(out[name].detach()[~mask[name]], p.detach()[~mask[name]])
    assert mask_fraction(mask, trained) == pytest.approx(0.25, abs=1e-4)


def test_random_label_never_assigns_the_true_label():
    labels = np.tile(np.arange(10, dtype=np.int64), 1000)
    wrong = random_other_labels(labels, 10, torch.Generator().manual_seed(0))
    assert (wrong != labels).all()
    assert wrong.min() >= 0 and wrong.max() <= 9
    shifts = np.bincount((wrong - labels) % 10, minlength=10)
    assert shifts[0] == 0 and (shifts[1:] > 900).all()  # each of the 9 other classes ~1111 times
    assert (random_other_labels(np.array([0, 1, 1, 0]), 2, torch.Generator()) == [1, 0, 0, 1]).all()
    with pytest.raises(ValueError):
        random_other_labels(np.array([3]), 3, torch.Generator())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_ascent_raises_the_forget_loss(seed, digits, trained):
    retain, forget, _ = digits
    before = cross_entropy_per_example(predict_logits(trained, forget), forget.y).mean()
    cfg = dataclasses.replace(FAST, epochs=3, batch_size=16, lr=0.1, seed=seed)  # 12 steps, order varies by seed
    out = unlearn("gradient_ascent", trained, retain, forget, cfg)
    after = cross_entropy_per_example(predict_logits(out, forget), forget.y).mean()
    assert after > before + 0.5, (before, after)


def test_retrain_ignores_the_original_weights(digits, trained):
    retain, forget, _ = digits
    other = build_model("cnn", (1, 8, 8), 10, seed=123)
    first = unlearn("retrain", trained, retain, forget, FAST)
    second = unlearn("retrain", other, retain, forget, FAST)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                 strict=True))


def test_head_mask_covers_the_last_linear_layer(trained):
    mask = head_mask(trained)
    assert set(mask) == {"3.weight", "3.bias"} and all(m.all() for m in mask.values())


def test_cosine_schedule_matches_torchs_cosine_annealing():
    from fedsparse.unlearning.core import Trainer

    model = torch.nn.Linear(2, 2)
    trainer = Trainer(model, UnlearnConfig(lr=0.1, epochs=5, cosine=True))
    reference_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_opt, T_max=5, eta_min=0.001)
    for _ in range(5):
        trainer.end_epoch()
        reference_opt.step()
        reference.step()
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0], rel=1e-9)
