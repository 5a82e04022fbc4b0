"""Permutation alignment of model B to model A: weight matching and activation matching (Git Re-Basin).

Both return a `Permutation` `perm` (see `spec.py` for the convention) such that `apply_permutation(spec, perm,
state_b)` is as close as they can make it to `state_a`; `perm[name][i]` is the unit of B matched with unit i of A.

- Weight matching maximises `sum_l <W_l^A, P_l W_l^B P_{l-1}^T>` by coordinate descent: permutations are visited
  in a seeded random order; each is replaced by the solution of a linear assignment problem
  (`scipy.optimize.linear_sum_assignment`) with the others fixed, when that improves the objective; it stops after a
  sweep without improvement or `max_iter` sweeps. Data-free.
- Activation matching matches, per permutation independently, the units of the spec's activation module by the
  Pearson correlation of their outputs over the data (all samples and spatial positions).
- Permutations with a GroupNorm group size g > 1 are solved in two levels: every pair of groups gets the value of
  its best within-group assignment, then groups are assigned to groups; the result keeps groups together.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from fedsparse.alignment.spec import Permutation, PermutationSpec, identity_permutation, permute_entry
from fedsparse.merging.state import StateDict


@dataclass(frozen=True)
class WeightMatchingResult:
    """The permutation found, the number of coordinate-descent sweeps, and the final objective value."""

    permutation: Permutation
    sweeps: int
    objective: float


def assign(score: np.ndarray, group_size: int = 1) -> np.ndarray:
    """The permutation `perm` maximising `sum_i score[i, perm[i]]`, keeping groups of `group_size` consecutive units
    together (exact for group size 1; two-level for larger groups)."""
    size = score.shape[0]
    if score.shape != (size, size) or size % group_size:
        raise ValueError(f"score must be square with a size divisible by {group_size}, got {score.shape}")
    if group_size == 1:
        _, columns = linear_sum_assignment(score, maximize=True)
        return columns
    groups = size // group_size
    blocks = score.reshape(groups, group_size, groups, group_size).transpose(0, 2, 1, 3)
    block_value = np.zeros((groups, groups))
    inner = np.zeros((groups, groups, group_size), dtype=np.int64)
    for row in range(groups):
        for column in range(groups):
            rows, columns = linear_sum_assignment(blocks[row, column], maximize=True)
            block_value[row, column] = blocks[row, column][rows, columns].sum()
            inner[row, column] = columns
    _, block_columns = linear_sum_assignment(block_value, maximize=True)
    return np.concatenate([block_columns[row] * group_size + inner[row, block_columns[row]] for row in range(groups)])


def _units_first(spec: PermutationSpec, key: str, value: torch.Tensor, axis: int) -> torch.Tensor:
    view = value.reshape(spec.views.get(key, tuple(value.shape)))
    return view.movedim(axis, 0).reshape(view.shape[axis], -1).double()


def weight_matching(spec: PermutationSpec, state_a: StateDict, state_b: StateDict, *, max_iter: int = 100,
                    seed: int = 0) -> WeightMatchingResult:
    """Align B to A by weight matching (coordinate descent over the spec's permutations; see module docstring)."""
    perm_axes = spec.perm_to_axes()
    permutation = identity_permutation(spec)
    generator = torch.Generator().manual_seed(seed)
    names = list(spec.sizes)
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        improved = False
        for index in torch.randperm(len(names), generator=generator).tolist():
            name = names[index]
            score = np.zeros((spec.sizes[name], spec.sizes[name]))
            for key, axis in perm_axes[name]:
                units_a = _units_first(spec, key, state_a[key], axis)
                others_b = permute_entry(spec, permutation, key, state_b[key], skip_axis=axis)
                units_b = _units_first(spec, key, others_b, axis)
                score += (units_a @ units_b.T).numpy()
            new = assign(score, spec.group_size(name))
            old = permutation[name].numpy()
            rows = np.arange(len(new))
            if score[rows, new].sum() > score[rows, old].sum() + 1e-12 * max(1.0, abs(score[rows, old].sum())):
                permutation[name] = torch.as_tensor(new, dtype=torch.long)
                improved = True
        if not improved:
            break
    return WeightMatchingResult(permutation, sweeps, _objective(spec, state_a, state_b, permutation))


def _objective(spec: PermutationSpec, state_a: StateDict, state_b: StateDict, permutation: Permutation) -> float:
    total = 0.0
    for key, names in spec.axes.items():
        if any(name is not None for name in names) and torch.is_floating_point(state_a[key]):
            permuted = permute_entry(spec, permutation, key, state_b[key])
            total += float((state_a[key].double() * permuted.double()).sum())
    return total


@torch.no_grad()
def activation_matching(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module,
                        batches: Iterable[torch.Tensor], eps: float = 1e-12) -> Permutation:
    """Align B to A by the correlation of the spec's activation modules' outputs on `batches` (model inputs)."""
    missing = [name for name in spec.sizes if name not in spec.activations]
    if missing:
        raise ValueError(f"spec names no activation module for {missing}")
    moments: dict[str, dict[str, torch.Tensor]] = {name: {} for name in spec.sizes}
    outputs: dict[tuple[str, str], torch.Tensor] = {}

    def make_hook(side: str, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            outputs[(side, name)] = output.detach().movedim(1, 0).reshape(output.shape[1], -1).double()
        return hook

    handles = []
    for side, model in (("a", model_a), ("b", model_b)):
        modules = dict(model.named_modules())
        for name, module_name in spec.activations.items():
            handles.append(modules[module_name].register_forward_hook(make_hook(side, name)))
    states = [model_a.training, model_b.training]
    model_a.eval()
    model_b.eval()
    try:
        for batch in batches:
            model_a(batch)
            model_b(batch)
            for name in spec.sizes:
                a, b = outputs[("a", name)], outputs[("b", name)]
                stats = moments[name]
                for label, value in (("count", torch.tensor(float(a.shape[1]))), ("sum_a", a.sum(1)),
                                     ("sum_b", b.sum(1)), ("sq_a", (a * a).sum(1)), ("sq_b", (b * b).sum(1)),
                                     ("cross", a @ b.T)):
                    stats[label] = stats.get(label, 0) + value
    finally:
        for handle in handles:
            handle.remove()
        model_a.train(states[0])
        model_b.train(states[1])
    permutation = {}
    for name, stats in moments.items():
        if not stats:
            raise ValueError("no batches")
        count = stats["count"]
        mean_a, mean_b = stats["sum_a"] / count, stats["sum_b"] / count
        std_a = (stats["sq_a"] / count - mean_a**2).clamp(min=0).sqrt()
        std_b = (stats["sq_b"] / count - mean_b**2).clamp(min=0).sqrt()
        covariance = stats["cross"] / count - mean_a[:, None] * mean_b[None, :]
        correlation = covariance / (std_a[:, None] * std_b[None, :] + eps)
        permutation[name] = torch.as_tensor(assign(correlation.numpy(), spec.group_size(name)), dtype=torch.long)
    return permutation
