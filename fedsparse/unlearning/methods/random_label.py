"""Random-label: train on the retain set together with the forget set relabelled at random.

Every forget example gets a label drawn uniformly from the *other* classes, y' = (y + u) mod C with u uniform in
{1, ..., C-1}, so it never keeps its true label (SalUn's code draws from all C classes; excluding the true one is
the stronger, unambiguous version). The relabelled forget set and the retain set are shuffled together.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsparse.unlearning.core import ArrayData, Trainer, UnlearnConfig, batches, cross_entropy, num_classes_of, prepare


def random_other_labels(labels: np.ndarray, num_classes: int, generator: torch.Generator) -> np.ndarray:
    """For each label, one drawn uniformly from the other `num_classes - 1` classes."""
    if num_classes < 2:
        raise ValueError(f"relabelling needs at least 2 classes, got {num_classes}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    shift = torch.randint(1, num_classes, (len(labels),), generator=generator).numpy()
    return ((labels + shift) % num_classes).astype(np.int64)


def relabelled_union(retain: ArrayData, forget: ArrayData, num_classes: int, generator: torch.Generator) -> ArrayData:
    """The retain set plus the forget set with random other labels."""
    wrong = random_other_labels(forget.y, num_classes, generator)
    return ArrayData(np.concatenate([retain.x, forget.x]), np.concatenate([retain.y, wrong]))


def random_label(model: nn.Module, retain: ArrayData, forget: ArrayData, cfg: UnlearnConfig) -> nn.Module:
    """`epochs` of SGD on retain + randomly relabelled forget (on `cfg.mask` only, if set)."""
    work, device, generator = prepare(model, cfg)
    data = relabelled_union(retain, forget, num_classes_of(work, forget, device), generator)
    work.train()
    trainer = Trainer(work, cfg, mask=cfg.mask)
    for _ in range(cfg.epochs):
        for xb, yb in batches(data, cfg.batch_size, generator, device):
            trainer.step(cross_entropy(work, xb, yb))
        trainer.end_epoch()
    return work.eval()
