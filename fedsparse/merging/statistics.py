"""Per-channel activation statistics of chosen layers, and per-channel affine corrections applied with forward hooks.

Used by TACT (per-task correction towards each expert's statistics) and REPAIR (correction of an interpolated
model towards the interpolated endpoint statistics). Works on any `nn.Module`: layers are named as in
`model.named_modules()`, and the channel axis of a layer's output is `channel_dim` (1 for Linear `(N, C)` and conv
`(N, C, H, W)` outputs).

Invariants:
- Statistics are exact population statistics over every sample and every non-channel position of the calibration
  batches (accumulated in float64), not running averages: `std = sqrt(E[x^2] - E[x]^2)`.
- A correction maps a layer's output `x` to `scale * x + shift` per channel. `fit_corrections` fits the layers in
  the order given, each with the corrections of the earlier ones already active, so that after fitting every
  layer's corrected output has exactly the target mean and std on the calibration batches (up to float32 rounding).
  Channels whose own std is below `min_std` are only shifted (scale 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and standard deviation of one layer's output (1-D tensors of the channel count)."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass(frozen=True)
class ChannelAffine:
    """`x -> scale * x + shift` per channel of one layer's output."""

    scale: torch.Tensor
    shift: torch.Tensor


def _module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"model has no module named '{name}'")
    return modules[name]


def _channel_view(output: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """The output as (channels, everything else)."""
    return output.detach().movedim(channel_dim, 0).reshape(output.shape[channel_dim], -1).double()


def _broadcast(values: torch.Tensor, output: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * output.dim()
    shape[channel_dim] = -1
    return values.to(output.dtype).view(shape)


@torch.no_grad()
def record_channel_stats(model: nn.Module, layers: Sequence[str], batches: Iterable[torch.Tensor],
                         channel_dim: int = 1) -> dict[str, ChannelStats]:
    """Per-channel mean and std of the outputs of `layers` over all `batches` (model inputs), in eval mode.
    A layer called more than once per forward pass is rejected (its statistics would mix two activations)."""
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(layers, 0)
    calls: dict[str, int] = dict.fromkeys(layers, 0)

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            view = _channel_view(output, channel_dim)
            calls[name] += 1
            sums[name] = sums.get(name, 0) + view.sum(1)
            squares[name] = squares.get(name, 0) + (view * view).sum(1)
            counts[name] += view.shape[1]
        return hook

    handles = [_module(model, name).register_forward_hook(make_hook(name)) for name in layers]
    was_training = model.training
    model.eval()
    passes = 0
    try:
        for batch in batches:
            model(batch)
            passes += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if passes == 0:
        raise ValueError("no calibration batches")
    stats = {}
    for name in layers:
        if calls[name] != passes:
            raise ValueError(f"layer '{name}' ran {calls[name]} times in {passes} forward passes; "
                             f"choose a module that runs once per pass")
        mean = sums[name] / counts[name]
        variance = (squares[name] / counts[name] - mean * mean).clamp(min=0.0)
        stats[name] = ChannelStats(mean.float(), variance.sqrt().float())
    return stats


class AffineHooks:
    """Forward hooks that apply per-channel affine corrections to named layers of a model while active.

    `set(corrections)` replaces the corrections in force; `remove()` detaches every hook.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], channel_dim: int = 1) -> None:
        """Install (identity) hooks on `layers` of `model`."""
        self.channel_dim = channel_dim
        self.corrections: dict[str, ChannelAffine] = {}
        self._handles = [_module(model, name).register_forward_hook(self._make_hook(name)) for name in layers]

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            correction = self.corrections.get(name)
            if correction is None:
                return None
            return (output * _broadcast(correction.scale, output, self.channel_dim)
                    + _broadcast(correction.shift, output, self.channel_dim))
        return hook

    def set(self, corrections: dict[str, ChannelAffine]) -> None:
        """Make `corrections` (layer name -> affine) the ones applied; layers not named pass through."""
        self.corrections = dict(corrections)

    def remove(self) -> None:
        """Detach all hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def affine_to_target(current: ChannelStats, target: ChannelStats, min_std: float = 1e-8) -> ChannelAffine:
    """The per-channel affine that maps activations with statistics `current` to statistics `target`:
    `scale = target.std / current.std`, `shift = target.mean - scale * current.mean`."""
    flat = current.std < min_std
    scale = torch.where(flat, torch.ones_like(current.std), target.std / current.std.clamp(min=min_std))
    return ChannelAffine(scale, target.mean - scale * current.mean)


def fit_corrections(model: nn.Module, targets: dict[str, ChannelStats], batches: Sequence[torch.Tensor],
                    channel_dim: int = 1, min_std: float = 1e-8) -> dict[str, ChannelAffine]:
    """Fit per-channel affines for the layers of `targets` (in their order, which must be forward order) so that the
    model's corrected outputs have the target statistics on `batches`. The model is left unchanged."""
    layers = list(targets)
    hooks = AffineHooks(model, layers, channel_dim)
    fitted: dict[str, ChannelAffine] = {}
    try:
        for name in layers:
            hooks.set(fitted)
            current = record_channel_stats(model, [name], batches, channel_dim)[name]
            if current.mean.shape != targets[name].mean.shape:
                raise ValueError(f"layer '{name}': {current.mean.numel()} channels, target has "
                                 f"{targets[name].mean.numel()}")
            fitted[name] = affine_to_target(current, targets[name], min_std)
    finally:
        hooks.remove()
    return fitted


@torch.no_grad()
def fuse_affine(module: nn.Module, correction: ChannelAffine) -> None:
    """Fold a per-output-channel affine into a Linear or Conv layer with a bias (in place):
    `W <- scale * W`, `b <- scale * b + shift`. Raises `ValueError` for other modules or a layer without bias."""
    if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) or module.bias is None:
        raise ValueError(f"cannot fold an affine into {type(module).__name__} without a bias; keep the hooks")
    shape = [-1] + [1] * (module.weight.dim() - 1)
    module.weight.mul_(correction.scale.view(shape).to(module.weight.dtype))
    module.bias.mul_(correction.scale.to(module.bias.dtype)).add_(correction.shift.to(module.bias.dtype))
