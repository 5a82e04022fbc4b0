"""L1-sparse: finetune on the retain set with an L1 penalty on all parameters whose weight decays linearly to zero,
loss = CE(retain) + l1_coefficient * (1 - epoch / epochs) * ||theta||_1 (Jia et al. 2023, as in DEL's baselines)."""

from __future__ import annotations

from torch import nn

from fedsparse.unlearning.core import ArrayData, Trainer, UnlearnConfig, batches, cross_entropy, prepare


def l1_sparse(model: nn.Module, retain: ArrayData, forget: ArrayData, cfg: UnlearnConfig) -> nn.Module:
    """`epochs` of SGD on `retain` with the decaying L1 penalty; `forget` is unused."""
    work, device, generator = prepare(model, cfg)
    trainer = Trainer(work, cfg, mask=cfg.mask)
    for epoch in range(cfg.epochs):
        weight = cfg.l1_coefficient * (1 - epoch / cfg.epochs)
        for xb, yb in batches(retain, cfg.batch_size, generator, device):
            penalty = sum(p.abs().sum() for p in work.parameters())
            trainer.step(cross_entropy(work, xb, yb) + weight * penalty)
        trainer.end_epoch()
    return work.eval()
