"""Loss and accuracy barriers along linear interpolation of 2 models, and over the simplex of k models.

For models with states s_1..s_k and a grid of weights w on the simplex (all `w_i = n_i / resolution`):
- loss barrier = max_w [ L(sum_i w_i s_i) - sum_i w_i L(s_i) ];
- accuracy barrier = max_w [ sum_i w_i A(s_i) - A(sum_i w_i s_i) ].
Both are >= 0 because the grid contains the vertices, where the two terms are equal. Mixed states come from
`fedsparse.merging.weighted_average` (a vertex is the model itself, bit for bit; identical states mix to themselves),
so a model with itself has barrier exactly 0. Where a model has running normalisation statistics, pass `reset_stats`
(e.g. `reset_batchnorm_statistics` over training batches) to re-estimate them at every grid point before evaluating.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsparse.merging.state import StateDict, weighted_average


@dataclass(frozen=True)
class Evaluation:
    """Mean loss and accuracy (fraction in [0, 1]) of a model on some data."""

    loss: float
    accuracy: float


Evaluator = Callable[[nn.Module], Evaluation]


@dataclass(frozen=True)
class BarrierResult:
    """Grid weights, the evaluation at each grid point, and the two barriers (see module docstring)."""

    weights: tuple[tuple[float, ...], ...]
    evaluations: tuple[Evaluation, ...]
    loss_barrier: float
    accuracy_barrier: float


def dataset_evaluator(x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> Evaluator:
    """An evaluator computing cross-entropy and accuracy on arrays `(x, y)` with `fedsparse.train.evaluate`."""
    from fedsparse.train import evaluate

    def run(model: nn.Module) -> Evaluation:
        loss, accuracy = evaluate(model, x, y, batch_size=batch_size)
        return Evaluation(loss, accuracy)

    return run


@torch.no_grad()
def reset_batchnorm_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm layer's running mean and variance on `batches` as a cumulative average
    (momentum None); models without BatchNorm are left unchanged."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            model(batch)
    finally:
        for norm, momentum in zip(norms, saved, strict=True):
            norm.momentum = momentum
        model.train(was_training)


def simplex_grid(count: int, resolution: int) -> list[tuple[float, ...]]:
    """All weight vectors of length `count` with entries `n_i / resolution`, `n_i >= 0`, summing to 1."""
    if count < 1 or resolution < 1:
        raise ValueError(f"need count >= 1 and resolution >= 1, got {count}, {resolution}")
    points = [parts for parts in itertools.product(range(resolution + 1), repeat=count) if sum(parts) == resolution]
    return [tuple(part / resolution for part in parts) for parts in points]


def simplex_barrier(model: nn.Module, states: Sequence[StateDict], evaluate: Evaluator, resolution: int = 4,
                    reset_stats: Callable[[nn.Module], None] | None = None) -> BarrierResult:
    """Barriers over the simplex grid of `states` (loaded into a copy of `model`; the caller's model is untouched)."""
    work = copy.deepcopy(model)
    grid = simplex_grid(len(states), resolution)
    evaluations = []
    for weights in grid:
        work.load_state_dict(weighted_average(states, weights))
        if reset_stats is not None:
            reset_stats(work)
        evaluations.append(evaluate(work))
    vertex = {weights.index(1.0): evaluation for weights, evaluation in zip(grid, evaluations, strict=True)
              if 1.0 in weights}
    loss_barrier = accuracy_barrier = 0.0
    for weights, evaluation in zip(grid, evaluations, strict=True):
        expected_loss = sum(weight * vertex[i].loss for i, weight in enumerate(weights))
        expected_accuracy = sum(weight * vertex[i].accuracy for i, weight in enumerate(weights))
        loss_barrier = max(loss_barrier, evaluation.loss - expected_loss)
        accuracy_barrier = max(accuracy_barrier, expected_accuracy - evaluation.accuracy)
    return BarrierResult(tuple(grid), tuple(evaluations), loss_barrier, accuracy_barrier)


def linear_barrier(model: nn.Module, state_a: StateDict, state_b: StateDict, evaluate: Evaluator,
                   num_points: int = 11, reset_stats: Callable[[nn.Module], None] | None = None) -> BarrierResult:
    """Barriers along `(1 - alpha) * a + alpha * b` for `num_points` evenly spaced alpha in [0, 1]; the result's
    weights are `(1 - alpha, alpha)` in increasing alpha."""
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    result = simplex_barrier(model, [state_a, state_b], evaluate, num_points - 1, reset_stats)
    order = sorted(range(len(result.weights)), key=lambda index: result.weights[index][1])
    return BarrierResult(tuple(result.weights[i] for i in order), tuple(result.evaluations[i] for i in order),
                         result.loss_barrier, result.accuracy_barrier)
