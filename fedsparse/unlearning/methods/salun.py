"""SalUn (Fan et al., ICLR 2024): random-label unlearning restricted to a gradient-saliency mask.

The mask holds the `salun_fraction` of parameters with the largest |sum of grad(-CE) over the forget set|, ranked
entry by entry across the whole model, computed on the original model; then random-label training runs in freeze
mode on it (weights outside keep their values exactly, as the current SalUn code restores them). A `cfg.mask`, if
given, is intersected with the saliency mask.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fedsparse.unlearning.core import ArrayData, UnlearnConfig
from fedsparse.unlearning.localization import localize
from fedsparse.unlearning.methods.random_label import random_label


def salun(model: nn.Module, retain: ArrayData, forget: ArrayData, cfg: UnlearnConfig) -> nn.Module:
    """Random-label on the SalUn saliency mask."""
    mask = localize(model, forget, fraction=cfg.salun_fraction, criterion="grad", granularity="param",
                    batch_size=cfg.batch_size)
    if cfg.mask is not None:
        mask = {name: m & cfg.mask[name] if name in cfg.mask else torch.zeros_like(m) for name, m in mask.items()}
    return random_label(model, retain, forget, dataclasses.replace(cfg, mask=mask))
