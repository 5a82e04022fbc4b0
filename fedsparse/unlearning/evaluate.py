"""Evaluating unlearning: accuracies and their gaps to retraining, a loss-threshold membership-inference AUC, cost,
and the NeurIPS 2023 Machine Unlearning Challenge's forgetting score. Device-agnostic: models run on the device
given, every statistic is computed in numpy (float64) on CPU.

The competition score (google-deepmind/unlearning_evaluation, `metric.py` and `main.py`), re-implemented and
vectorised over thresholds and models:

1. N unlearned and N retrained models. For every forget example x with label y and every model, the logit-scaled
   confidence phi = log p_y - log sum_{j != y} p_j (`logit_scaled_confidence`).
2. Per example, two samples of N values. "Positive" is the one with the larger median. Attacks = thresholds on phi,
   on the released code's grid of 100 points per unit of phi: a single threshold t (positive if phi >= t) over
   [min, max] of both samples, and a double threshold [l, r] (positive inside; "positive" re-assigned to the sample
   of smaller range) with r over [min_p + w - 2, max_p + 2] and, for each r, 400 values of l over
   [r - w - 2, r - w + 2], w the smaller range. Each threshold gives FPR and FNR over the N models.
3. Per threshold: eps = max(log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR), clipped at 0; infinite
   if FPR = FNR = 0 (perfect separation); discarded if exactly one of them is 0 (too few samples). eps_x is the
   maximum over the surviving thresholds, clipped to [0, 50]; it is 50 outright when the ratio of the two samples'
   ranges is below 0.01 (one distribution much peakier). Where no threshold survives (both samples one and the same
   constant) we return 0: nothing tells them apart (the released code fails an assertion there).
4. H(eps) = 2^-floor(2 eps) if eps < ceil(ln(N - 1)), else 0; forgetting quality F = mean of H over the forget set.
5. Score = F * (mean retain accuracy of the unlearned models / that of the retrained ones)
           * (mean test accuracy of the unlearned models / that of the retrained ones).

Resolution in N (`epsilon_resolution`): the smallest non-zero rate is 1/N, so a finite eps is at most
ln(N(1 - delta) - 1) ~ ln(N - 1); eps between that and ceil(ln(N - 1)) cannot occur, and perfect separation scores 0.
N = 512 (the competition): eps resolved up to 6.24, the lowest non-zero H is 2^-12. N = 16: up to 2.71, lowest 2^-5.
N = 8: up to 1.95, lowest 2^-3 — four score levels in all (1, 1/2, 1/4, 1/8) besides 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from fedsparse.unlearning.core import ArrayData

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
DOUBLE_THRESHOLD_BUFFER = 2.0
PEAKY_RANGE_RATIO = 0.01


# ----------------------------------------------------------------------------------------------------------------
# Accuracies, membership inference, cost


@torch.no_grad()
def predict_logits(model: nn.Module, data: ArrayData, *, batch_size: int = 1000,
                   device: torch.device | None = None) -> np.ndarray:
    """The model's logits on every example of `data`, float64 numpy array [examples, classes]."""
    device = device or next(model.parameters()).device
    model.to(device).eval()
    out = [model(torch.from_numpy(data.x[start:start + batch_size]).to(device)).double().cpu().numpy()
           for start in range(0, len(data), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def cross_entropy_per_example(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy -log softmax(logits)[label], computed stably."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return log_norm - shifted[np.arange(len(labels)), labels]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of examples whose largest logit is the label's."""
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")


def loss_threshold_mia_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """ROC AUC of the attack "lower loss means member" separating `member_losses` (label 1; for unlearning, the
    forget set) from `nonmember_losses` (label 0; the test set). 0.5: indistinguishable, the ideal after unlearning
    when forget and test data come from one distribution; 1: every member has a lower loss than every non-member."""
    if len(member_losses) == 0 or len(nonmember_losses) == 0:
        raise ValueError("both the member and the non-member losses must be non-empty")
    labels = np.concatenate([np.ones(len(member_losses)), np.zeros(len(nonmember_losses))])
    scores = -np.concatenate([member_losses, nonmember_losses])
    return float(roc_auc_score(labels, scores))


def fraction_changed(before: nn.Module, after: nn.Module) -> float:
    """Share of all parameter entries whose value differs (not bit-equal) between two models of one architecture."""
    after_params = dict(after.named_parameters())
    changed, total = 0, 0
    for name, p in before.named_parameters():
        q = after_params[name].detach().to(p.device)
        if q.shape != p.shape:
            raise ValueError(f"{name}: shapes differ, {tuple(p.shape)} vs {tuple(q.shape)}")
        changed += int((p.detach() != q).sum())
        total += p.numel()
    return changed / total


@dataclass(frozen=True)
class UnlearningMetrics:
    """What one unlearned (or retrained) model scores. Accuracies in [0, 1]; `mia_auc` as in
    `loss_threshold_mia_auc` (forget vs test); `fraction_changed` against the original model."""

    forget_accuracy: float
    retain_accuracy: float
    test_accuracy: float
    mia_auc: float
    seconds: float
    fraction_changed: float


@dataclass(frozen=True)
class AccuracyGaps:
    """Accuracy of the unlearned model minus that of the retrained one (0 is ideal; DEL's paper reports the
    opposite sign, oracle minus method)."""

    forget: float
    retain: float
    test: float


def evaluate_model(model: nn.Module, original: nn.Module, retain: ArrayData, forget: ArrayData, test: ArrayData, *,
                   seconds: float = float("nan"), device: torch.device | None = None) -> UnlearningMetrics:
    """Accuracies on the three sets, the loss-threshold MIA AUC (forget vs test) and the share of parameters that
    differ from `original`; `seconds` is passed through."""
    forget_logits = predict_logits(model, forget, device=device)
    test_logits = predict_logits(model, test, device=device)
    return UnlearningMetrics(
        forget_accuracy=accuracy(forget_logits, forget.y),
        retain_accuracy=accuracy(predict_logits(model, retain, device=device), retain.y),
        test_accuracy=accuracy(test_logits, test.y),
        mia_auc=loss_threshold_mia_auc(cross_entropy_per_example(forget_logits, forget.y),
                                       cross_entropy_per_example(test_logits, test.y)),
        seconds=seconds,
        fraction_changed=fraction_changed(original, model),
    )


def gaps_to_retrained(metrics: UnlearningMetrics, retrained: UnlearningMetrics) -> AccuracyGaps:
    """Accuracy gaps of `metrics` to the retrained model's."""
    return AccuracyGaps(forget=metrics.forget_accuracy - retrained.forget_accuracy,
                        retain=metrics.retain_accuracy - retrained.retain_accuracy,
                        test=metrics.test_accuracy - retrained.test_accuracy)


# ----------------------------------------------------------------------------------------------------------------
# The NeurIPS 2023 competition's forgetting score


def logit_scaled_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = log p_y - log sum_{j != y} p_j per example (LiRA's statistic), stable for large logits."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    correct = probs[rows, labels].copy()
    probs[rows, labels] = 0.0
    wrong = probs.sum(axis=1)  # summed, not 1 - correct: that would cancel to 0 for confident predictions
    return np.log(correct + 1e-45) - np.log(wrong + 1e-45)


@dataclass(frozen=True)
class AttackRates:
    """False positive and false negative rates over the N models, one entry per threshold of an attack family."""

    fpr: np.ndarray
    fnr: np.ndarray


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_values, thresholds, side="left")


def single_threshold_rates(positive: np.ndarray, negative: np.ndarray) -> AttackRates:
    """Rates of the rule "positive if phi >= t" for t on the grid over [min, max] of both samples."""
    both = np.concatenate([positive, negative])
    low, high = both.min(), both.max()
    thresholds = np.linspace(low, high, math.ceil((high - low) * THRESHOLDS_PER_UNIT))
    pos_sorted, neg_sorted = np.sort(positive), np.sort(negative)
    fnr = _count_below(pos_sorted, thresholds) / len(positive)
    fpr = 1.0 - _count_below(neg_sorted, thresholds) / len(negative)
    return AttackRates(fpr=fpr, fnr=fnr)


def double_threshold_rates(positive: np.ndarray, negative: np.ndarray) -> AttackRates:
    """Rates of the rule "positive if l <= phi <= r", where "positive" is re-assigned to the sample with the smaller
    range (the peakier one), on the released code's grid (module docstring, step 2)."""
    pos_range = positive.max() - positive.min()
    neg_range = negative.max() - negative.min()
    if pos_range >= neg_range:
        positive, negative = negative, positive
    width = min(pos_range, neg_range)
    buffer = DOUBLE_THRESHOLD_BUFFER
    low = positive.min() + width - buffer
    high = positive.max() + buffer
    right = np.linspace(low, high, math.ceil((high - low) * THRESHOLDS_PER_UNIT))
    num_left = math.ceil(2 * buffer * THRESHOLDS_PER_UNIT)
    left = np.linspace(right - width - buffer, right - width + buffer, num=num_left, axis=1).reshape(-1)
    right = np.repeat(right, num_left)
    pos_sorted, neg_sorted = np.sort(positive), np.sort(negative)

    def inside(sorted_values: np.ndarray) -> np.ndarray:
        return np.searchsorted(sorted_values, right, side="right") - _count_below(sorted_values, left)

    return AttackRates(fpr=inside(neg_sorted) / len(negative), fnr=1.0 - inside(pos_sorted) / len(positive))


def epsilon_from_rates(rates: AttackRates, delta: float = DELTA) -> float:
    """The largest eps over the thresholds (module docstring, step 3), before the cap; 0 if none is informative."""
    fpr, fnr = rates.fpr, rates.fnr
    if np.any((fpr == 0) & (fnr == 0)):
        return math.inf
    informative = (fpr > 0) & (fnr > 0)
    if not informative.any():
        return 0.0
    fpr, fnr = fpr[informative], fnr[informative]
    with np.errstate(invalid="ignore", divide="ignore"):
        # a rate of 1 makes one log's argument negative (nan): fmax lets the other term decide, like nanmax does
        candidates = np.fmax(np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr))
    if np.all(np.isnan(candidates)):
        return 0.0
    return float(max(np.nanmax(candidates), 0.0))


def example_epsilon(unlearned: np.ndarray, retrained: np.ndarray, delta: float = DELTA) -> float:
    """eps_x of one forget example from its N unlearned and N retrained confidences, in [0, EPSILON_CAP]."""
    unlearned = np.asarray(unlearned, dtype=np.float64)
    retrained = np.asarray(retrained, dtype=np.float64)
    retrained_positive = np.median(retrained) > np.median(unlearned)
    positive, negative = (retrained, unlearned) if retrained_positive else (unlearned, retrained)
    ranges = sorted([np.ptp(positive), np.ptp(negative)])
    if ranges[1] > 0 and ranges[0] / ranges[1] < PEAKY_RANGE_RATIO:
        return EPSILON_CAP
    eps = max(epsilon_from_rates(single_threshold_rates(positive, negative), delta),
              epsilon_from_rates(double_threshold_rates(positive, negative), delta))
    return float(min(eps, EPSILON_CAP))


def per_example_epsilons(unlearned_confidences: np.ndarray, retrained_confidences: np.ndarray,
                         delta: float = DELTA) -> np.ndarray:
    """eps_x for every forget example; both inputs [N models, examples] of logit-scaled confidences."""
    unlearned_confidences = np.asarray(unlearned_confidences, dtype=np.float64)
    retrained_confidences = np.asarray(retrained_confidences, dtype=np.float64)
    if unlearned_confidences.ndim != 2 or unlearned_confidences.shape != retrained_confidences.shape:
        raise ValueError(f"confidences must be two [models, examples] arrays of one shape, got "
                         f"{unlearned_confidences.shape} and {retrained_confidences.shape}")
    check_num_models(unlearned_confidences.shape[0])
    return np.array([example_epsilon(unlearned_confidences[:, i], retrained_confidences[:, i], delta)
                     for i in range(unlearned_confidences.shape[1])])


def check_num_models(num_models: int) -> None:
    """Raise ValueError unless `num_models` >= 3 (with 2, ceil(ln(N - 1)) = 0 and every example scores 0)."""
    if num_models < 3:
        raise ValueError(f"the forgetting score needs at least 3 models per side, got {num_models}")


@dataclass(frozen=True)
class EpsilonResolution:
    """What N models per side can resolve: finite eps never exceeds `max_finite_epsilon`; H is 0 from
    `score_cutoff` = ceil(ln(N - 1)) on; `lowest_nonzero_score` is the smallest H a finite eps can earn."""

    num_models: int
    max_finite_epsilon: float
    score_cutoff: float
    lowest_nonzero_score: float


def epsilon_resolution(num_models: int, delta: float = DELTA) -> EpsilonResolution:
    """The resolution of the forgetting score with `num_models` models per side (module docstring)."""
    check_num_models(num_models)
    max_finite = math.log(1 - delta - 1 / num_models) - math.log(1 / num_models)
    cutoff = float(math.ceil(math.log(num_models - 1)))
    return EpsilonResolution(num_models=num_models, max_finite_epsilon=max_finite, score_cutoff=cutoff,
                             lowest_nonzero_score=float(forget_points(np.array([max_finite]), num_models)[0]))


def forget_points(epsilons: np.ndarray, num_models: int) -> np.ndarray:
    """H(eps) = 2^-floor(2 eps) for eps < ceil(ln(N - 1)), else 0, per example."""
    check_num_models(num_models)
    epsilons = np.asarray(epsilons, dtype=np.float64)
    cutoff = math.ceil(math.log(num_models - 1))
    return np.where(epsilons < cutoff, np.exp2(-np.floor(2 * np.minimum(epsilons, cutoff))), 0.0)


@dataclass(frozen=True)
class ForgettingScore:
    """The competition's score and its parts. `score = forgetting_quality * retain_ratio * test_ratio`."""

    score: float
    forgetting_quality: float
    retain_ratio: float
    test_ratio: float
    num_models: int
    epsilons: np.ndarray
    resolution: EpsilonResolution


def forgetting_score(unlearned_confidences: np.ndarray, retrained_confidences: np.ndarray, *,
                     unlearned_retain_accuracy: Sequence[float] | float, retrained_retain_accuracy: Sequence[float] | float,
                     unlearned_test_accuracy: Sequence[float] | float, retrained_test_accuracy: Sequence[float] | float,
                     delta: float = DELTA) -> ForgettingScore:
    """The NeurIPS 2023 unlearning competition's score from [N, examples] confidences of N unlearned and N retrained
    models on the forget set, and their retain and test accuracies (one per model, averaged, or already averaged)."""
    epsilons = per_example_epsilons(unlearned_confidences, retrained_confidences, delta)
    num_models = np.asarray(unlearned_confidences).shape[0]
    quality = float(forget_points(epsilons, num_models).mean())
    retain_ratio = float(np.mean(unlearned_retain_accuracy) / np.mean(retrained_retain_accuracy))
    test_ratio = float(np.mean(unlearned_test_accuracy) / np.mean(retrained_test_accuracy))
    return ForgettingScore(score=quality * retain_ratio * test_ratio, forgetting_quality=quality,
                           retain_ratio=retain_ratio, test_ratio=test_ratio, num_models=num_models,
                           epsilons=epsilons, resolution=epsilon_resolution(num_models, delta))
