"""REPAIR (Jordan et al., ICLR 2023) for the interpolation of two (aligned) models.

The interpolated model `(1 - alpha) * A + alpha * B` loses activation variance. REPAIR measures, at chosen layers,
the per-channel mean and std of A and B on data, and rescales/shifts the interpolated model's channels at those
layers so that they have the interpolated statistics: mean `(1 - alpha) mu_A + alpha mu_B`, std
`(1 - alpha) sigma_A + alpha sigma_B`. The models in `fedsparse.models` have GroupNorm or no normalisation, so the
layers are chosen Linear/Conv modules and the correction acts on their outputs (pre-activations).

Invariant: after `repair`, the chosen layers' per-channel statistics of the returned model on the calibration
batches equal the targets (corrections are fitted layer by layer in forward order). With `fuse=True` the corrections
are folded into the layers' weights and biases (the architecture is unchanged); a layer without a bias cannot be
folded, and then the corrections stay as forward hooks on the returned model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedsparse.merging.state import interpolate
from fedsparse.merging.statistics import (
    AffineHooks,
    ChannelAffine,
    ChannelStats,
    fit_corrections,
    fuse_affine,
    record_channel_stats,
)


@dataclass
class RepairResult:
    """The repaired interpolated model, its per-layer corrections and targets, and whether they were folded into
    the weights (`hooks` is None then) or live on as forward hooks (`hooks`)."""

    model: nn.Module
    corrections: dict[str, ChannelAffine]
    targets: dict[str, ChannelStats]
    fused: bool
    hooks: AffineHooks | None


def interpolated_targets(stats_a: dict[str, ChannelStats], stats_b: dict[str, ChannelStats],
                         alpha: float) -> dict[str, ChannelStats]:
    """Per layer: mean and std interpolated linearly between A's (alpha 0) and B's (alpha 1)."""
    return {name: ChannelStats((1 - alpha) * stats_a[name].mean + alpha * stats_b[name].mean,
                               (1 - alpha) * stats_a[name].std + alpha * stats_b[name].std) for name in stats_a}


def repair(model_a: nn.Module, model_b: nn.Module, alpha: float, layers: Sequence[str],
           batches: Sequence[torch.Tensor], *, fuse: bool = True) -> RepairResult:
    """The interpolation of `model_a` and `model_b` (B already aligned to A) at `alpha`, REPAIRed at `layers`
    (forward order) on `batches` (model inputs). The input models are not modified."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    targets = interpolated_targets(record_channel_stats(model_a, layers, batches),
                                   record_channel_stats(model_b, layers, batches), alpha)
    merged = copy.deepcopy(model_a)
    merged.load_state_dict(interpolate(model_a.state_dict(), model_b.state_dict(), alpha))
    corrections = fit_corrections(merged, targets, batches)
    modules = dict(merged.named_modules())
    foldable = all(isinstance(modules[name], nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
                   and modules[name].bias is not None for name in layers)
    if fuse and foldable:
        for name in layers:
            fuse_affine(modules[name], corrections[name])
        return RepairResult(merged, corrections, targets, True, None)
    hooks = AffineHooks(merged, layers)
    hooks.set(corrections)
    return RepairResult(merged, corrections, targets, False, hooks)
