"""NegGrad+: descend on the retain set and ascend on the forget set at once,
loss = beta * CE(retain batch) - (1 - beta) * CE(forget batch), one forget batch per retain batch (the forget
batches cycle)."""

from __future__ import annotations

from torch import nn

from fedsparse.unlearning.core import ArrayData, Trainer, UnlearnConfig, batches, cross_entropy, cycle_batches, prepare


def neggrad_plus(model: nn.Module, retain: ArrayData, forget: ArrayData, cfg: UnlearnConfig) -> nn.Module:
    """`epochs` passes over `retain`, each step paired with a forget batch; weight `cfg.neggrad_beta`."""
    work, device, generator = prepare(model, cfg)
    trainer = Trainer(work, cfg, mask=cfg.mask)
    forget_batches = cycle_batches(forget, cfg.batch_size, generator, device)
    beta = cfg.neggrad_beta
    for _ in range(cfg.epochs):
        for xb, yb in batches(retain, cfg.batch_size, generator, device):
            xf, yf = next(forget_batches)
            trainer.step(beta * cross_entropy(work, xb, yb) - (1 - beta) * cross_entropy(work, xf, yf))
        trainer.end_epoch()
    return work.eval()
