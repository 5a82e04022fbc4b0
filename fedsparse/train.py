"""Local training and evaluation on in-memory tensors, with optional fixed sparsity masks.

With masks, pruned weights stay exactly zero: their gradients are zeroed before the optimiser step (so momentum
never builds up there), and the weights are multiplied by the mask after it (so weight decay, or any
optimiser that moves a weight with zero gradient, cannot revive them).

The optimiser comes from the registry `fedsparse.optim.OPTIMIZERS` (`TrainConfig.optimizer`, default "sgd":
`fedsparse.optim.sgd.SGD`, which computes on CPU exactly what the torch.optim.SGD call before the registry did,
without importing torch._dynamo: the SGD path is bit-identical).

A client procedure may change two more things (the seams of `train_local`):
- `objective(model, logits, targets) -> loss`: what is minimised (default `cross_entropy`; a continual method
  adds a penalty toward an anchor). The returned mean training loss is the objective's value.
- `callbacks`: each `callback(model, step)` runs after every optimiser step, in order, with the 1-based step
  number of this call (e.g. client-side SFA). The masks are applied after the callbacks, so a callback that moves
  weights cannot revive a pruned one.
With neither, the loop performs exactly the same operations as before the seams existed (bit-identical on CPU).

Two input transforms, both off by default (then no operation of the loop changes):
- `TrainConfig.augment = "crop-flip"`: every training batch gets a random crop of its 4-pixel zero-padded images
  and a horizontal flip with probability 1/2, drawn from a numpy generator seeded with (seed, AUGMENT_STREAM), so a
  run stays deterministic and the shuffling order does not change. `saliency_scores(augment=...)` does the same to
  its batches, as the SSFL paper's code does.
- `TrainConfig.normalize = ChannelStats`: inputs are standardised per channel; pass the same stats to
  `saliency_scores` and `evaluate` so every path sees the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsparse.data import ChannelStats
from fedsparse.optim import build_optimizer

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, logits, targets) -> loss
StepCallback = Callable[[nn.Module, int], None]  # (model, 1-based optimiser step) after every step
AUGMENTATIONS = ("none", "crop-flip")
AUGMENT_STREAM = 0xA06  # second entry of the augmentation generator's seed, apart from every other stream
CROP_PADDING = 4


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings; `optimizer` names an entry of `fedsparse.optim.OPTIMIZERS`."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    optimizer: str = "sgd"
    augment: str = "none"
    normalize: ChannelStats | None = None


def crop_flip(xb: torch.Tensor, rng: np.random.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """A random crop of every zero-padded image of `xb` (N, C, H, W), then a horizontal flip with probability
    1/2; offsets and flips come from `rng`. Returns a new tensor; `xb` is untouched."""
    n, _, height, width = xb.shape
    padded = nn.functional.pad(xb, (padding, padding, padding, padding))
    offsets = rng.integers(0, 2 * padding + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    crops = [padded[i, :, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(offsets)]
    return torch.stack([c.flip(-1) if flip else c for c, flip in zip(crops, flips)])


def normalize_batch(xb: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """(xb - mean) / std per channel."""
    mean = torch.tensor(stats.mean, dtype=xb.dtype, device=xb.device).view(1, -1, 1, 1)
    std = torch.tensor(stats.std, dtype=xb.dtype, device=xb.device).view(1, -1, 1, 1)
    return (xb - mean) / std


def _augmenter(augment: str, seed: int) -> np.random.Generator | None:
    """The augmentation generator for `seed`, or None when `augment` is "none"; ValueError on unknown names."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    return None if augment == "none" else np.random.default_rng([seed, AUGMENT_STREAM])


def _transform(xb: torch.Tensor, augmenter: np.random.Generator | None, stats: ChannelStats | None) -> torch.Tensor:
    if augmenter is not None:
        xb = crop_flip(xb, augmenter)
    if stats is not None:
        xb = normalize_batch(xb, stats)
    return xb


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but torch sees no CUDA GPU here")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cross_entropy(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default objective: mean cross-entropy of `logits` against `targets` (`model` is unused)."""
    return nn.functional.cross_entropy(logits, targets)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every pruned weight in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    *,
    seed: int,
    masks: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
    objective: Objective | None = None,
    callbacks: Sequence[StepCallback] = (),
) -> float:
    """Train `model` in place with the optimiser `cfg.optimizer` names, minimising `objective` (default
    `cross_entropy`) and calling every callback after each optimiser step; returns the mean training loss (the
    objective's value). Deterministic for `seed` on CPU."""
    device = device or torch.device("cpu")
    model.to(device).train()
    masks = {k: m.to(device=device, dtype=torch.float32) for k, m in (masks or {}).items()}
    params = dict(model.named_parameters())
    opt = build_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    objective = objective or cross_entropy
    augmenter = _augmenter(cfg.augment, seed)
    total, count, step = 0.0, 0, 0
    apply_masks(model, masks)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb, yb = xt[idx].to(device), yt[idx].to(device)
            if augmenter is not None or cfg.normalize is not None:
                xb = _transform(xb, augmenter, cfg.normalize)
            opt.zero_grad(set_to_none=True)
            loss = objective(model, model(xb), yb)
            loss.backward()
            for name, mask in masks.items():
                params[name].grad.mul_(mask)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            for callback in callbacks:
                callback(model, step)
            apply_masks(model, masks)
            total += loss.item() * len(idx)
            count += len(idx)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1000,
             device: torch.device | None = None, normalize: ChannelStats | None = None) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of `model` on (x, y), inputs standardised with `normalize` if given."""
    device = device or torch.device("cpu")
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[start:start + batch_size]).to(device)
        yb = torch.from_numpy(y[start:start + batch_size]).to(device)
        if normalize is not None:
            xb = normalize_batch(xb, normalize)
        out = model(xb)
        loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    n = max(len(x), 1)
    return loss_sum / n, correct / n


def saliency_scores(model: nn.Module, x: np.ndarray, y: np.ndarray, names: list[str], *, batch_size: int,
                    batches: int, seed: int, device: torch.device | None = None, augment: str = "none",
                    normalize: ChannelStats | None = None) -> dict[str, torch.Tensor]:
    """SNIP-style saliency |w * dL/dw| at the model's current weights, averaged over `batches` shuffled
    minibatches (one by default, as in SSFL), for the tensors in `names`; each batch augmented (`augment`, seeded
    from `seed`) and standardised (`normalize`) as in `train_local`."""
    device = device or torch.device("cpu")
    model.to(device).eval()
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    scores = {n: torch.zeros_like(params[n]) for n in names}
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    augmenter = _augmenter(augment, seed)
    used = 0
    for b in range(batches):
        idx = order[(b * batch_size) % len(x):][:batch_size]
        if len(idx) == 0:
            break
        model.zero_grad(set_to_none=True)
        xb = _transform(xt[idx].to(device), augmenter, normalize)
        nn.functional.cross_entropy(model(xb), yt[idx].to(device)).backward()
        for n in names:
            scores[n] += (params[n].detach() * params[n].grad).abs()
        used += 1
    model.zero_grad(set_to_none=True)
    return {n: (s / max(used, 1)).cpu() for n, s in scores.items()}
