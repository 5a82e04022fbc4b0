"""What every unlearning method shares: the data it gets, its configuration, and one SGD loop with freeze masks.

Invariants:
- An unlearning method never modifies the model it is given: it works on a deep copy and returns that.
- A `Mask` maps parameter names (as in `model.named_parameters()`) to boolean tensors of the parameter's shape.
  True means *trainable*. A parameter whose name is absent from the mask is frozen whole.
- Freeze mode (`FreezeGuard`): a weight outside the mask keeps its value bit for bit. Its gradient is zeroed before
  every optimiser step (so momentum never builds up there) and, after the step, its saved value is written back (so
  weight decay or momentum cannot move it either). This differs from `fedsparse.train`'s sparsity masks, which
  *zero* what lies outside: right for sparse training, wrong for unlearning, where the frozen weights carry the
  knowledge to keep.
- Randomness (data order, fresh initialisations, random labels) comes from generators seeded by `UnlearnConfig.seed`,
  so a method is deterministic for a seed on CPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Mask = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class ArrayData:
    """An in-memory labelled dataset: `x` float32 inputs (first axis = examples), `y` int64 class labels."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} examples but y has {len(self.y)}")
        if self.x.dtype != np.float32:
            raise ValueError(f"x must be float32, got {self.x.dtype}")
        if self.y.dtype != np.int64:
            raise ValueError(f"y must be int64, got {self.y.dtype}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> ArrayData:
        """The examples at `index` (an index array or a boolean mask)."""
        return ArrayData(self.x[index], self.y[index])


@dataclass(frozen=True, eq=False)
class UnlearnConfig:
    """Settings of every unlearning method; each method reads the fields it needs.

    Shared training loop:
        epochs: passes over the method's main data (retain set; forget set for gradient ascent).
        batch_size: minibatch size.
        lr: SGD learning rate.
        momentum, weight_decay: SGD settings.
        grad_clip: clip the global gradient norm to this value; 0 = no clipping.
        cosine: anneal the learning rate with a cosine from `lr` to `0.01 * lr` over the epochs (as DEL does).
        seed: seeds data order, fresh initialisations and random labels.
        device: torch device name ("cpu", "cuda", ...).
        mask: optional freeze mask: if set, the method runs *localized*, only the True entries change.
    Retraining (the oracle):
        retrain_epochs, retrain_lr: the training budget of a model trained from scratch on the retain set.
    Method knobs:
        neggrad_beta: NegGrad+ loss = beta * CE(retain) - (1 - beta) * CE(forget).
        l1_coefficient: L1-sparse loss = CE(retain) + l1_coefficient * (1 - epoch / epochs) * ||theta||_1.
        salun_fraction: share of parameters in SalUn's saliency mask.
        del_alpha: share of all parameters DEL selects (whole channels; see `localization.select_top_fraction`).
        del_topk_fraction: DEL's per-channel score is the mean of the top k = max(1, int(fraction * C_out))
            entries of the channel's row (k depends on the number of output channels, as in the released code).
        scrub_max_epochs: SCRUB runs its forget-set "max" pass in the first this-many epochs only.
        scrub_temperature: distillation temperature T of SCRUB's KL terms.
        scrub_alpha, scrub_gamma: SCRUB's retain loss = gamma * CE + alpha * KL_T(teacher || student).
    """

    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    cosine: bool = False
    seed: int = 0
    device: str = "cpu"
    mask: Mask | None = None
    retrain_epochs: int = 10
    retrain_lr: float = 0.05
    neggrad_beta: float = 0.99
    l1_coefficient: float = 5e-4
    salun_fraction: float = 0.5
    del_alpha: float = 0.3
    del_topk_fraction: float = 0.1
    scrub_max_epochs: int = 2
    scrub_temperature: float = 2.0
    scrub_alpha: float = 0.5
    scrub_gamma: float = 1.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "retrain_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "retrain_lr", "scrub_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("neggrad_beta", "salun_fraction", "del_alpha", "del_topk_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.scrub_max_epochs < 0 or self.l1_coefficient < 0 or self.grad_clip < 0:
            raise ValueError("scrub_max_epochs, l1_coefficient and grad_clip must be >= 0")


UnlearnFn = Callable[[nn.Module, ArrayData, ArrayData, UnlearnConfig], nn.Module]


def full_mask(model: nn.Module) -> Mask:
    """A mask that makes every parameter trainable."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}


def mask_union(first: Mask, second: Mask) -> Mask:
    """Entry-wise OR of two masks (a name in only one of them keeps that one's tensor)."""
    out = {name: m.clone() for name, m in first.items()}
    for name, m in second.items():
        out[name] = out[name] | m if name in out else m.clone()
    return out


def head_names(model: nn.Module) -> list[str]:
    """Parameter names of the classifier head: the last `nn.Linear` module in module order."""
    last = None
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = prefix
    if last is None:
        raise ValueError("the model has no nn.Linear layer to serve as the classifier head")
    return [f"{last}.{name}" if last else name for name, _ in model.get_submodule(last).named_parameters()]


FRESH_INIT_SEED_OFFSET = 0x5EED_1417


def fresh_initialisation(model: nn.Module, seed: int) -> nn.Module:
    """A copy of `model` with every module's parameters re-drawn by its own `reset_parameters()`, under the torch
    seed `seed + FRESH_INIT_SEED_OFFSET`: the same architecture, a fresh random initialisation, reproducible for the
    seed. (The offset keeps it from reproducing the original model's initialisation when that was built, e.g. by
    `fedsparse.models.build_model`, with a small seed such as the same `seed`.)"""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + FRESH_INIT_SEED_OFFSET)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return fresh


def num_classes_of(model: nn.Module, data: ArrayData, device: torch.device) -> int:
    """Number of outputs of `model`, read from one forward pass on the first example."""
    model.eval()
    with torch.no_grad():
        return int(model(torch.from_numpy(data.x[:1]).to(device)).shape[1])


def batches(data: ArrayData, batch_size: int, generator: torch.Generator,
            device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over `data` in minibatches (the last one may be smaller)."""
    order = torch.randperm(len(data), generator=generator).numpy()
    for start in range(0, len(data), batch_size):
        idx = order[start:start + batch_size]
        yield torch.from_numpy(data.x[idx]).to(device), torch.from_numpy(data.y[idx]).to(device)


def cycle_batches(data: ArrayData, batch_size: int, generator: torch.Generator,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled minibatches of `data`, reshuffled at the end of every pass, forever."""
    while True:
        yield from batches(data, batch_size, generator, device)


class FreezeGuard:
    """Keeps every parameter entry outside `mask` at its current value, bit for bit (see the module docstring).

    Call `mask_gradients()` after `backward()` and `restore()` after the optimiser step.
    """

    def __init__(self, model: nn.Module, mask: Mask) -> None:
        params = dict(model.named_parameters())
        unknown = set(mask) - set(params)
        if unknown:
            raise ValueError(f"mask names unknown parameters: {sorted(unknown)[:5]}")
        self._params = params
        self._trainable: dict[str, torch.Tensor] = {}
        self._saved: dict[str, torch.Tensor] = {}
        for name, p in params.items():
            m = mask.get(name)
            if m is not None and m.shape != p.shape:
                raise ValueError(f"mask for {name} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
            if m is not None and bool(m.all()):
                continue  # fully trainable: nothing to guard
            self._trainable[name] = (m.to(p.device, torch.bool) if m is not None
                                     else torch.zeros_like(p, dtype=torch.bool))
            self._saved[name] = p.detach().clone()

    def mask_gradients(self) -> None:
        """Zero the gradient of every frozen entry."""
        for name, m in self._trainable.items():
            grad = self._params[name].grad
            if grad is not None:
                grad.mul_(m)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved value back into every frozen entry."""
        for name, m in self._trainable.items():
            p = self._params[name]
            p.copy_(torch.where(m, p, self._saved[name]))


class Trainer:
    """SGD over a model with an optional freeze mask and an optional cosine schedule (per epoch)."""

    def __init__(self, model: nn.Module, cfg: UnlearnConfig, *, lr: float | None = None, epochs: int | None = None,
                 mask: Mask | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.base_lr = cfg.lr if lr is None else lr
        self.epochs = cfg.epochs if epochs is None else epochs
        self.optimizer = torch.optim.SGD(model.parameters(), lr=self.base_lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.guard = FreezeGuard(model, mask) if mask is not None else None
        self.epoch = 0

    def step(self, loss: torch.Tensor) -> float:
        """One optimiser step on `loss`; returns its value."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.guard is not None:
            self.guard.mask_gradients()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        if self.guard is not None:
            self.guard.restore()
        return float(loss.detach())

    def end_epoch(self) -> None:
        """Advance the learning-rate schedule by one epoch."""
        self.epoch += 1
        if self.cfg.cosine:
            low = 0.01 * self.base_lr
            lr = low + 0.5 * (self.base_lr - low) * (1 + math.cos(math.pi * min(self.epoch, self.epochs) / self.epochs))
            for group in self.optimizer.param_groups:
                group["lr"] = lr


def prepare(model: nn.Module, cfg: UnlearnConfig) -> tuple[nn.Module, torch.device, torch.Generator]:
    """The working copy of `model` on the configured device in train mode, the device, and the seeded generator."""
    device = torch.device(cfg.device)
    work = copy.deepcopy(model).to(device)
    work.train()
    return work, device, torch.Generator().manual_seed(cfg.seed)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `model` on one batch."""
    return nn.functional.cross_entropy(model(x), y)
