"""Localization: which parameters to change when unlearning, as a freeze `Mask` any method can run on.

Scores come from one pass over the forget set at the current weights, in eval mode, with no optimiser step:
G = sum over minibatches b (consecutive, in data order) of grad_theta(-CE_b) (the negated mean cross-entropy of each batch), then per entry

- `grad` (SalUn):            |G|
- `weighted_grad` (DEL):     |theta * G|
- `weight` (magnitude):      |theta|

Granularity:
- `param`: every entry is ranked on its own score.
- `channel` (DEL): every tensor with ndim > 1 is viewed as [out_channels, -1]; each row gets one score, the mean of
  its top k = max(1, int(topk_fraction * out_channels)) entries (k depends on the number of rows, as in DEL's released
  code, which would take k = 0 below 10 rows; we take at least 1), and the row is selected or not as a whole.
  1-D tensors (biases, norm parameters) keep per-entry scores.

Selection (`select_top_fraction`), the rounding rule: with P parameters in all and target T = ceil(fraction * P),
units (rows or single entries) are taken in descending score order, ties in parameter order, until at least T
entries are selected. So the selected count lies in [T, T + s - 1], s the size of the last unit taken (one channel
at most), exactly like the released code's `score >= quantile` cut, which keeps the straddling channel whole.

Scores of several parts of a forget set (held apart, e.g. by clients of a federation) combine by
`weighted_mean_scores` before the selection; with one part that is the part's own mask, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedsparse.unlearning.core import ArrayData, Mask

CRITERIA = ("grad", "weighted_grad", "weight")
GRANULARITIES = ("param", "channel")


def localization_scores(model: nn.Module, forget: ArrayData, *, criterion: str = "weighted_grad",
                        batch_size: int = 128, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Per-entry scores (see the module docstring) for every parameter, returned on CPU; `model` is left unchanged
    and stays where it is (the batches go to `device`, by default the device of the model's parameters)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion '{criterion}'; known: {', '.join(CRITERIA)}")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    if criterion == "weight":
        return {name: p.detach().abs().cpu() for name, p in params.items()}
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    for start in range(0, len(forget), batch_size):  # in order: the batches fix which per-batch means are summed
        xb = torch.from_numpy(forget.x[start:start + batch_size]).to(device)
        yb = torch.from_numpy(forget.y[start:start + batch_size]).to(device)
        model.zero_grad(set_to_none=True)
        (-nn.functional.cross_entropy(model(xb), yb)).backward()
        for name, p in params.items():
            if p.grad is not None:
                grads[name] += p.grad
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if criterion == "grad":
        return {name: g.abs().cpu() for name, g in grads.items()}
    return {name: (params[name].detach() * g).abs().cpu() for name, g in grads.items()}


def channel_scores(scores: dict[str, torch.Tensor], topk_fraction: float = 0.1) -> dict[str, torch.Tensor]:
    """One score per output channel of every tensor with ndim > 1 (mean of the row's top k entries, k as in the
    module docstring), shape [out_channels]; 1-D tensors keep their per-entry scores."""
    if not 0 < topk_fraction <= 1:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    out = {}
    for name, s in scores.items():
        if s.ndim > 1:
            rows = s.reshape(s.shape[0], -1)
            k = min(max(1, int(topk_fraction * s.shape[0])), rows.shape[1])
            out[name] = rows.topk(k, dim=1).values.mean(dim=1)
        else:
            out[name] = s.clone()
    return out


def select_top_fraction(scores: dict[str, torch.Tensor], shapes: dict[str, torch.Size], fraction: float) -> Mask:
    """The mask of the top `fraction` of all parameters by score, whole units at a time (rounding rule in the
    module docstring). `scores[name]` has one score per unit: shape [out_channels] for a tensor of more dimensions
    than its score (a channel score), or the tensor's own shape (per-entry scores)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if set(scores) != set(shapes):
        raise ValueError("scores and shapes must name the same parameters")
    unit_scores, unit_sizes = [], []
    for name, shape in shapes.items():
        s = scores[name].detach().reshape(-1).double().numpy()
        numel = math.prod(shape)
        if len(s) * (numel // max(len(s), 1)) != numel:
            raise ValueError(f"{name}: {len(s)} scores do not divide a tensor of shape {tuple(shape)}")
        unit_scores.append(s)
        unit_sizes.append(np.full(len(s), numel // len(s), dtype=np.int64))
    all_scores = np.concatenate(unit_scores)
    all_sizes = np.concatenate(unit_sizes)
    target = math.ceil(fraction * int(all_sizes.sum()))
    order = np.argsort(-all_scores, kind="stable")
    taken_units = int(np.searchsorted(np.cumsum(all_sizes[order]), target)) + 1
    chosen = np.zeros(len(all_scores), dtype=bool)
    chosen[order[:taken_units]] = True
    mask, start = {}, 0
    for name, shape in shapes.items():
        units = len(scores[name].reshape(-1))
        per_unit = torch.from_numpy(chosen[start:start + units].copy())
        start += units
        per_entry = math.prod(shape) // units
        mask[name] = per_unit.repeat_interleave(per_entry).reshape(shape)
    return mask


def unit_scores(model: nn.Module, forget: ArrayData, *, criterion: str = "weighted_grad",
                granularity: str = "channel", topk_fraction: float = 0.1, batch_size: int = 128,
                device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The scores `localize` ranks, one per unit (`channel`: a row of a tensor with ndim > 1, or an entry of a 1-D
    tensor; `param`: every entry), before any selection: what `select_top_fraction` takes."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity '{granularity}'; known: {', '.join(GRANULARITIES)}")
    scores = localization_scores(model, forget, criterion=criterion, batch_size=batch_size, device=device)
    return channel_scores(scores, topk_fraction) if granularity == "channel" else scores


def weighted_mean_scores(shares: Sequence[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """The weighted mean, in float64, of unit scores computed on several parts of a forget set: `shares` holds
    (scores, weight) pairs with the same names and shapes and weights > 0 (the forget examples behind each).

    With one share the result is that share's scores exactly (its weight normalises to 1.0, and float32 -> float64
    is exact), so `select_top_fraction` of it is the mask of the scores alone, bit for bit."""
    if not shares:
        raise ValueError("weighted_mean_scores needs at least one share")
    names = set(shares[0][0])
    if any(set(scores) != names for scores, _ in shares):
        raise ValueError("every share must score the same parameters")
    if any(not weight > 0 for _, weight in shares):
        raise ValueError(f"every weight must be > 0, got {[weight for _, weight in shares]}")
    total = math.fsum(weight for _, weight in shares)
    combined = {name: torch.zeros(shares[0][0][name].shape, dtype=torch.float64) for name in shares[0][0]}
    for scores, weight in shares:
        for name, values in scores.items():
            if values.shape != combined[name].shape:
                raise ValueError(f"{name}: scores of shape {tuple(values.shape)}, expected "
                                 f"{tuple(combined[name].shape)}")
            combined[name] += (weight / total) * values.detach().double()
    return combined


def localize(model: nn.Module, forget: ArrayData, *, fraction: float, criterion: str = "weighted_grad",
             granularity: str = "channel", topk_fraction: float = 0.1, batch_size: int = 128,
             device: torch.device | None = None) -> Mask:
    """The freeze mask of the `fraction` of parameters most implicated in the forget set: `select_top_fraction`
    of `unit_scores`.

    DEL: `criterion="weighted_grad", granularity="channel", fraction=0.3`; SalUn: `criterion="grad",
    granularity="param", fraction=0.5`.
    """
    scores = unit_scores(model, forget, criterion=criterion, granularity=granularity, topk_fraction=topk_fraction,
                         batch_size=batch_size, device=device)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return select_top_fraction(scores, shapes, fraction)


def mask_fraction(mask: Mask, model: nn.Module) -> float:
    """Share of all of `model`'s parameters that `mask` makes trainable."""
    total = sum(p.numel() for p in model.parameters())
    return sum(int(m.sum()) for m in mask.values()) / total


@torch.no_grad()
def reset_masked(model: nn.Module, mask: Mask, fresh: nn.Module) -> None:
    """In place: theta <- (1 - M) * theta + M * theta_fresh, with `fresh` a freshly initialised model of the same
    architecture (see `core.fresh_initialisation`)."""
    fresh_params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        if name in mask:
            p.copy_(torch.where(mask[name].to(p.device), fresh_params[name].to(p.device), p))
