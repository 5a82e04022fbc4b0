"""Unlearning evaluation (fedsparse.unlearning.evaluate): hand-computed epsilons, the score's known extremes on
synthetic confidence distributions, an independent brute-force check of the attack grid, MIA AUC and cost."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsparse.unlearning.core import ArrayData
from fedsparse.unlearning.evaluate import (
    DELTA,
    EPSILON_CAP,
    cross_entropy_per_example,
    epsilon_resolution,
    evaluate_model,
    example_epsilon,
    forget_points,
    forgetting_score,
    fraction_changed,
    logit_scaled_confidence,
    loss_threshold_mia_auc,
    per_example_epsilons,
)

PERFECT_UTILITY = {"unlearned_retain_accuracy": 0.9, "retrained_retain_accuracy": 0.9,
                   "unlearned_test_accuracy": 0.8, "retrained_test_accuracy": 0.8}


def reference_epsilon(unlearned: np.ndarray, retrained: np.ndarray, delta: float = DELTA) -> float:
    """A literal transcription of the competition's per-example procedure: the released grids (the left thresholds
    built right threshold by right threshold), rates as means of boolean comparisons over the models (no sorting,
    no searchsorted), and the released nan/inf bookkeeping."""
    if np.median(retrained) > np.median(unlearned):
        pos, neg = retrained, unlearned
    else:
        pos, neg = unlearned, retrained
    pos_diff, neg_diff = np.ptp(pos), np.ptp(neg)
    largest, smallest = max(pos_diff, neg_diff), min(pos_diff, neg_diff)
    if largest > 0 and smallest / largest < 0.01:
        return EPSILON_CAP
    both = np.concatenate([pos, neg])
    single = np.linspace(both.min(), both.max(), math.ceil((both.max() - both.min()) * 100))
    tpr_s, fpr_s = (pos[:, None] >= single).mean(0), (neg[:, None] >= single).mean(0)
    fnr_s, tnr_s = (pos[:, None] < single).mean(0), (neg[:, None] < single).mean(0)
    dpos, dneg = (neg, pos) if pos_diff >= neg_diff else (pos, neg)
    width = smallest
    low, high = dpos.min() + width - 2.0, dpos.max() + 2.0
    rights = np.linspace(low, high, math.ceil((high - low) * 100))
    left = np.concatenate([np.linspace(r - width - 2.0, r - width + 2.0, num=400) for r in rights])
    right = np.tile(rights.reshape(-1, 1), (1, 400)).reshape(-1)
    in_pos = ((left <= dpos[:, None]) & (dpos[:, None] <= right)).mean(0)
    in_neg = ((left <= dneg[:, None]) & (dneg[:, None] <= right)).mean(0)
    tpr = np.concatenate([in_pos, tpr_s])
    fnr = np.concatenate([1 - in_pos, fnr_s])
    fpr = np.concatenate([in_neg, fpr_s])
    tnr = np.concatenate([1 - in_neg, tnr_s])
    eps = np.where((fpr + fnr == 0) & (tpr + tnr == 2), np.inf, 0.0)
    eps = np.where((eps == 0) & (fpr * fnr == 0), np.nan, eps)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.clip(np.nanmax([np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr)],
                                   axis=0), 0, None)
    eps = np.where(eps == 0, values, eps)
    return float(np.clip(np.nanmax(eps), 0, EPSILON_CAP))


def test_epsilon_of_a_hand_computed_case():
    # N = 4. Unlearned {0, 2, 4, 6}, retrained {1, 3, 5, 7}: retrained has the larger median, so it is "positive".
    # Single threshold t in (2, 3]: FNR = 1/4 (1 < t), FPR = 2/4 (4, 6 >= t): log(1 - d - 1/2) - log(1/4) = ln 2.
    # No threshold of either family makes both rates 1/4 or better (any interval of width >= 4 inside the data
    # holds 2 of one sample), and FPR = FNR = 0 never happens: eps = ln(2 - 4d).
    unlearned, retrained = np.array([0.0, 2, 4, 6]), np.array([1.0, 3, 5, 7])
    expected = math.log(0.5 - DELTA) - math.log(0.25)
    assert example_epsilon(unlearned, retrained) == pytest.approx(expected, rel=1e-12)
    assert reference_epsilon(unlearned, retrained) == pytest.approx(expected, rel=1e-12)
    # ln 2 = 0.69 is in the bucket [0.5, 1): H = 1/2; ceil(ln 3) = 2, so the score's cut-off is 2.
    score = forgetting_score(unlearned[:, None], retrained[:, None], **PERFECT_UTILITY)
    assert score.forgetting_quality == 0.5 and score.score == 0.5 and score.resolution.score_cutoff == 2


def test_forget_points_are_the_released_buckets():
    eps = np.array([0.0, 0.49, 0.5, 1.0, 2.0, 3.0, 6.9, 7.0, 50.0])
    expected = [1, 1, 0.5, 0.25, 1 / 16, 1 / 64, 2.0**-13, 0, 0]
    assert forget_points(eps, 512).tolist() == expected
    assert forget_points(np.array([2.9, 3.0]), 16).tolist() == [2.0**-5, 0]


def test_epsilon_resolution_for_n():
    for n, max_finite, cutoff, lowest in [(8, math.log(7), 2, 1 / 8), (16, math.log(15), 3, 1 / 32),
                                          (512, math.log(511), 7, 2.0**-12)]:
        res = epsilon_resolution(n)
        assert res.max_finite_epsilon == pytest.approx(max_finite, abs=1e-3)
        assert res.score_cutoff == cutoff and res.lowest_nonzero_score == lowest
    with pytest.raises(ValueError, match="at least 3"):
        epsilon_resolution(2)


def test_identical_distributions_get_the_best_score():
    confidences = np.random.default_rng(0).normal(size=(16, 30))
    score = forgetting_score(confidences, confidences.copy(), **PERFECT_UTILITY)
    assert (score.epsilons == 0).all()
    assert score.forgetting_quality == 1.0 and score.score == 1.0


def test_separable_distributions_get_the_worst_score():
    rng = np.random.default_rng(1)
    unlearned = rng.normal(size=(16, 30))
    score = forgetting_score(unlearned, unlearned + 30, **PERFECT_UTILITY)
    assert (score.epsilons == EPSILON_CAP).all()
    assert score.forgetting_quality == 0.0 and score.score == 0.0


def test_a_peaky_unlearned_distribution_gets_the_cap():
    rng = np.random.default_rng(2)
    retrained = rng.normal(size=16)
    unlearned = 0.1 + 1e-4 * rng.normal(size=16)  # range ratio far below 0.01
    assert example_epsilon(unlearned, retrained) == EPSILON_CAP


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_falls_as_the_distributions_move_apart(seed):
    # Two independent samples of one distribution do not score 1: the largest eps over hundreds of thousands of
    # thresholds picks up sampling noise in the tails (with N = 16, F is about 0.19). The order is what must hold.
    rng = np.random.default_rng(seed)
    qualities = [forgetting_score(rng.normal(size=(16, 30)), rng.normal(size=(16, 30)) + shift,
                                  **PERFECT_UTILITY).forgetting_quality for shift in (0.0, 1.0, 3.0, 30.0)]
    assert qualities[0] > 1.4 * qualities[1] and qualities[1] > 2 * qualities[2] and qualities[3] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_epsilons_match_the_literal_procedure(seed):
    rng = np.random.default_rng(seed)
    unlearned = rng.normal(size=(6, 3)) * rng.uniform(0.3, 2, size=3)
    retrained = rng.normal(size=(6, 3)) + rng.uniform(-1, 1, size=3)
    ours = per_example_epsilons(unlearned, retrained)
    reference = [reference_epsilon(unlearned[:, i], retrained[:, i]) for i in range(3)]
    assert ours == pytest.approx(reference, rel=1e-9)


def test_utility_factors_multiply_the_quality():
    confidences = np.random.default_rng(3).normal(size=(8, 10))
    score = forgetting_score(confidences, confidences, unlearned_retain_accuracy=[0.8, 0.6],
                             retrained_retain_accuracy=0.9, unlearned_test_accuracy=0.4, retrained_test_accuracy=0.8)
    assert score.retain_ratio == pytest.approx(0.7 / 0.9) and score.test_ratio == pytest.approx(0.5)
    assert score.score == pytest.approx(0.7 / 0.9 * 0.5)


def test_logit_scaled_confidence_by_hand():
    logits = np.array([[0.0, math.log(3.0)], [1000.0, 0.0], [0.0, 0.0]])
    phi = logit_scaled_confidence(logits, np.array([1, 0, 1]))
    assert phi[0] == pytest.approx(math.log(3.0))  # p = (1/4, 3/4): log(3/4) - log(1/4)
    assert phi[1] == pytest.approx(-math.log(1e-45))  # no overflow; p_wrong underflows to 0, floored at 1e-45
    assert phi[2] == pytest.approx(0.0)
    # a confident prediction: p_wrong = e^-40 / (1 + e^-40) must be summed, not taken as 1 - p_y (which is 0.0)
    assert logit_scaled_confidence(np.array([[40.0, 0.0]]), np.array([0]))[0] == pytest.approx(40.0, rel=1e-9)


def test_loss_threshold_mia_auc_by_hand():
    assert loss_threshold_mia_auc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert loss_threshold_mia_auc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert loss_threshold_mia_auc(np.array([0.1, 0.4]), np.array([0.2, 0.3])) == 0.5
    with pytest.raises(ValueError):
        loss_threshold_mia_auc(np.array([]), np.array([0.1]))


def test_cross_entropy_per_example_matches_torch():
    logits = np.random.default_rng(4).normal(size=(5, 3)) * 10
    labels = np.array([0, 1, 2, 1, 0])
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), reduction="none")
    assert cross_entropy_per_example(logits, labels) == pytest.approx(expected.numpy())


def test_fraction_changed_and_evaluate_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other[1].weight[0, 0] += 1.0
    assert fraction_changed(model, other) == 1 / 15
    assert fraction_changed(model, model) == 0.0
    rng = np.random.default_rng(5)
    data = ArrayData(rng.normal(size=(20, 4)).astype(np.float32), rng.integers(0, 3, 20).astype(np.int64))
    metrics = evaluate_model(other, model, data, data.subset(np.arange(10)), data.subset(np.arange(10, 20)),
                             seconds=1.5)
    assert metrics.fraction_changed == 1 / 15 and metrics.seconds == 1.5
    assert 0 <= metrics.forget_accuracy <= 1 and 0 <= metrics.mia_auc <= 1


def test_confidence_arrays_must_match():
    with pytest.raises(ValueError, match="one shape"):
        per_example_epsilons(np.zeros((8, 3)), np.zeros((8, 4)))
    with pytest.raises(ValueError, match="at least 3"):
        per_example_epsilons(np.zeros((2, 3)), np.zeros((2, 3)))
