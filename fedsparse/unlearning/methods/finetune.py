"""Finetune: keep training the original model on the retain set only, hoping it forgets the rest."""

from __future__ import annotations

from torch import nn

from fedsparse.unlearning.core import ArrayData, Trainer, UnlearnConfig, batches, cross_entropy, prepare


def finetune(model: nn.Module, retain: ArrayData, forget: ArrayData, cfg: UnlearnConfig) -> nn.Module:
    """`epochs` of SGD with cross-entropy on `retain` (on `cfg.mask` only, if set); `forget` is unused."""
    work, device, generator = prepare(model, cfg)
    trainer = Trainer(work, cfg, mask=cfg.mask)
    for _ in range(cfg.epochs):
        for xb, yb in batches(retain, cfg.batch_size, generator, device):
            trainer.step(cross_entropy(work, xb, yb))
        trainer.end_epoch()
    return work.eval()
