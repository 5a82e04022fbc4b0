"""Quadratic penalties toward an anchor (L2, EWC) and the diagonal Fisher information that EWC weighs them by.

Penalty: lambda/2 * sum_k F_k (theta_k - theta*_k)^2 over the model's trainable parameters, where theta* is the
anchor (the model at the end of the previous task) and F = 1 for the L2 penalty.

Fisher: F_k = (1/N) sum_i (d/dtheta_k log p(y_i | x_i; theta))^2, the mean over N examples of the squared
*per-example* gradient of the log-likelihood (not the square of a batch-mean gradient). merging.md does not say
which labels to use, so the default is the **empirical** Fisher (y_i = the data's label); `labels="sampled"` draws
y_i ~ p(y | x_i; theta) from a seeded generator instead (the "true" Fisher, one sample per example).

Invariants:
- Penalties and Fisher estimation never modify the model's parameters; `estimate_fisher` leaves no gradients
  behind (`.grad` is as it was: it uses torch.func and never calls backward on the model).
- `FisherEstimate.num_examples` is the N the mean was taken over, so `aggregate_fishers` can weight clients by it:
  F = sum_c N_c F_c / sum_c N_c, which equals the Fisher over the union of the clients' examples.
- EWC over several tasks here is *online EWC* with decay 1: one anchor (the latest task's end model) and the sum of
  the Fishers of all past tasks (`accumulate_fisher`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

StateDict = dict[str, torch.Tensor]
FISHER_LABELS = ("empirical", "sampled")


@dataclass(frozen=True)
class FisherEstimate:
    """A diagonal Fisher (one tensor per trainable parameter) and the number of examples it averages over."""

    diagonal: StateDict
    num_examples: int


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


@dataclass(frozen=True)
class QuadraticPenalty:
    """lambda/2 * sum F (theta - anchor)^2 as a callable on a model (differentiable in the model's parameters).

    `weights` None means F = 1 everywhere (the L2 penalty). Only parameters named in `anchor` are penalised."""

    anchor: StateDict
    strength: float
    weights: StateDict | None = None

    def __post_init__(self) -> None:
        if self.strength < 0:
            raise ValueError(f"penalty strength must be >= 0, got {self.strength}")
        if self.weights is not None and set(self.weights) - set(self.anchor):
            extra = sorted(set(self.weights) - set(self.anchor))
            raise ValueError(f"weights for parameters without an anchor: {extra}")

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The penalty's value at the model's current parameters (a scalar tensor with a graph)."""
        total = None
        for name, param in _trainable(model).items():
            if name not in self.anchor:
                continue
            squared = (param - self.anchor[name].to(param.device)) ** 2
            if self.weights is not None:
                squared = self.weights[name].to(param.device) * squared
            term = squared.sum()
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no trainable parameter of the model is in the anchor")
        return 0.5 * self.strength * total


def l2_penalty(anchor: StateDict, strength: float) -> QuadraticPenalty:
    """lambda/2 * ||theta - anchor||^2."""
    return QuadraticPenalty(anchor, strength)


def ewc_penalty(anchor: StateDict, fisher: FisherEstimate, strength: float) -> QuadraticPenalty:
    """lambda/2 * sum F (theta - anchor)^2 with the diagonal Fisher `fisher`."""
    return QuadraticPenalty(anchor, strength, fisher.diagonal)


def estimate_fisher(model: nn.Module, x: np.ndarray, y: np.ndarray, *, labels: str = "empirical",
                    max_examples: int | None = None, batch_size: int = 256, seed: int = 0,
                    device: torch.device | None = None) -> FisherEstimate:
    """The diagonal Fisher of `model` on (x, y): the mean over examples of the squared per-example gradient of
    log p(y | x). Uses the first `max_examples` examples when given. The model is put in eval mode."""
    if labels not in FISHER_LABELS:
        raise ValueError(f"labels must be one of {FISHER_LABELS}, got {labels!r}")
    if max_examples is not None and max_examples <= 0:
        raise ValueError(f"max_examples must be positive or None, got {max_examples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = device or torch.device("cpu")
    x, y = x[:max_examples], y[:max_examples]
    if len(x) == 0:
        raise ValueError("cannot estimate a Fisher from no examples")
    model.to(device).eval()
    params = {name: param.detach() for name, param in _trainable(model).items()}
    buffers = {name: buffer.detach() for name, buffer in model.named_buffers()}
    generator = torch.Generator().manual_seed(seed)

    def log_likelihood(parameters: StateDict, example: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (parameters, buffers), (example.unsqueeze(0),))
        return torch.log_softmax(logits, dim=1)[0].gather(0, label.unsqueeze(0)).squeeze(0)

    per_example_grad = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    sums = {name: torch.zeros_like(param) for name, param in params.items()}
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
        if labels == "empirical":
            yb = torch.from_numpy(np.asarray(y[start:start + batch_size], dtype=np.int64)).to(device)
        else:
            with torch.no_grad():
                probs = torch.softmax(model(xb), dim=1).cpu()
            yb = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
        grads = per_example_grad(params, xb, yb)
        for name, value in grads.items():
            sums[name] += (value ** 2).sum(dim=0)
    return FisherEstimate({name: (total / len(x)).cpu() for name, total in sums.items()}, len(x))


def aggregate_fishers(estimates: Sequence[FisherEstimate]) -> FisherEstimate:
    """The example-weighted mean of clients' Fishers: sum_c N_c F_c / sum_c N_c, with N = sum_c N_c."""
    if not estimates:
        raise ValueError("no Fisher estimates to aggregate")
    keys = set(estimates[0].diagonal)
    for index, estimate in enumerate(estimates):
        if set(estimate.diagonal) != keys:
            raise ValueError(f"Fisher {index} covers other parameters than Fisher 0")
        if estimate.num_examples <= 0:
            raise ValueError(f"Fisher {index} has num_examples={estimate.num_examples}; it must be positive")
    total = sum(estimate.num_examples for estimate in estimates)
    diagonal = {key: sum(estimate.diagonal[key] * (estimate.num_examples / total) for estimate in estimates)
                for key in estimates[0].diagonal}
    return FisherEstimate(diagonal, total)


def accumulate_fisher(previous: FisherEstimate | None, new: FisherEstimate, decay: float = 1.0) -> FisherEstimate:
    """Online EWC: decay * F_previous + F_new (F_new alone when there is no previous one)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if previous is None:
        return new
    if set(previous.diagonal) != set(new.diagonal):
        raise ValueError("the two Fishers cover different parameters")
    diagonal = {key: decay * previous.diagonal[key] + value for key, value in new.diagonal.items()}
    return FisherEstimate(diagonal, previous.num_examples + new.num_examples)
