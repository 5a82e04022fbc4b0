"""Gradient ascent: maximise the cross-entropy on the forget set (SGD on its negation). Nothing holds the retain
accuracy up, so keep the budget small (`epochs`, `lr`)."""

from __future__ import annotations

from torch import nn

from fedsparse.unlearning.core import ArrayData, Trainer, UnlearnConfig, batches, cross_entropy, prepare


def gradient_ascent(model: nn.Module, retain: ArrayData, forget: ArrayData, cfg: UnlearnConfig) -> nn.Module:
    """`epochs` of SGD on -CE over `forget` (on `cfg.mask` only, if set); `retain` is unused."""
    work, device, generator = prepare(model, cfg)
    trainer = Trainer(work, cfg, mask=cfg.mask)
    for _ in range(cfg.epochs):
        for xb, yb in batches(forget, cfg.batch_size, generator, device):
            trainer.step(-cross_entropy(work, xb, yb))
        trainer.end_epoch()
    return work.eval()
