"""DEL (Deletion by Example Localization; Torkzadehmahani et al., TMLR 2025): localize, reset, finetune.

1. Localize: the `del_alpha` (30%) of all parameters with the largest weighted-gradient score |theta * grad(-CE)|
   over the forget set, ranked per output channel (mean of the row's top-k entries) and taken as whole channels
   (`localization.localize(criterion="weighted_grad", granularity="channel")`).
2. Reset: the selected parameters take the values of a fresh random initialisation of the same architecture
   (seeded by `seed`), not zero and not the original run's initialisation.
3. Finetune on the retain set, in freeze mode, only the selected parameters plus the whole classifier head (the last
   Linear layer): every other weight keeps its original value bit for bit. SGD with a cosine schedule down to
   0.01 * lr, as in the released code (the `cosine` flag is forced on). A `cfg.mask`, if given, replaces step 1.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fedsparse.unlearning.core import (
    ArrayData,
    Mask,
    UnlearnConfig,
    fresh_initialisation,
    head_names,
    mask_union,
    prepare,
)
from fedsparse.unlearning.localization import localize, reset_masked, unit_scores
from fedsparse.unlearning.methods.finetune import finetune


def del_mask(model: nn.Module, forget: ArrayData, cfg: UnlearnConfig) -> Mask:
    """DEL's localization mask (step 1) for `model` and `forget`."""
    return localize(model, forget, fraction=cfg.del_alpha, criterion="weighted_grad", granularity="channel",
                    topk_fraction=cfg.del_topk_fraction, batch_size=cfg.batch_size)


def del_scores(model: nn.Module, forget: ArrayData, cfg: UnlearnConfig) -> dict[str, torch.Tensor]:
    """The per-unit scores DEL's localization ranks (one per output channel of a tensor with ndim > 1, one per
    entry of a 1-D tensor), before the top `del_alpha` is taken: `del_mask` is `select_top_fraction` of them."""
    return unit_scores(model, forget, criterion="weighted_grad", granularity="channel",
                       topk_fraction=cfg.del_topk_fraction, batch_size=cfg.batch_size)


def head_mask(model: nn.Module) -> Mask:
    """A mask making the classifier head (all of it) trainable."""
    params = dict(model.named_parameters())
    return {name: torch.ones_like(params[name], dtype=torch.bool) for name in head_names(model)}


def deletion_by_localization(model: nn.Module, retain: ArrayData, forget: ArrayData,
                             cfg: UnlearnConfig) -> nn.Module:
    """DEL: reset the localized parameters to a fresh initialisation and finetune them and the head on `retain`."""
    mask = cfg.mask if cfg.mask is not None else del_mask(model, forget, cfg)
    work, _, _ = prepare(model, cfg)
    reset_masked(work, mask, fresh_initialisation(work, cfg.seed))
    trainable = mask_union(mask, head_mask(work))
    return finetune(work, retain, forget, dataclasses.replace(cfg, mask=trainable, cosine=True))
