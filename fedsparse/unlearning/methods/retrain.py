"""Retrain: train a freshly initialised model of the same architecture on the retain set only (the oracle every
unlearning method is measured against). Budget: `retrain_epochs` at `retrain_lr`; fresh init seeded by `seed`."""

from __future__ import annotations

from torch import nn

from fedsparse.unlearning.core import (
    ArrayData,
    Trainer,
    UnlearnConfig,
    batches,
    cross_entropy,
    fresh_initialisation,
    prepare,
)


def retrain(model: nn.Module, retain: ArrayData, forget: ArrayData, cfg: UnlearnConfig) -> nn.Module:
    """A model trained from scratch on `retain`; `model` only supplies the architecture, `forget` is unused."""
    work, device, generator = prepare(fresh_initialisation(model, cfg.seed), cfg)
    trainer = Trainer(work, cfg, lr=cfg.retrain_lr, epochs=cfg.retrain_epochs, mask=cfg.mask)
    for _ in range(cfg.retrain_epochs):
        for xb, yb in batches(retain, cfg.batch_size, generator, device):
            trainer.step(cross_entropy(work, xb, yb))
        trainer.end_epoch()
    return work.eval()
