"""SCRUB (Kurmanji et al., NeurIPS 2023): a student, started from the original model, moves away from the frozen
original (the teacher) on the forget set and stays close to it on the retain set.

Per epoch: in the first `scrub_max_epochs` epochs, a "max" pass over the forget set with loss -KL_T(teacher ||
student); then, every epoch, a "min" pass over the retain set with loss gamma * CE + alpha * KL_T(teacher ||
student), KL_T the temperature-T distillation divergence (scaled by T^2 as usual). Plain SGD here, like the other
methods (the SCRUB notebooks use Adam).
"""

from __future__ import annotations

import torch
from torch import nn

from fedsparse.unlearning.core import ArrayData, Trainer, UnlearnConfig, batches, prepare


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, batch mean, times T^2."""
    log_student = nn.functional.log_softmax(student_logits / temperature, dim=1)
    log_teacher = nn.functional.log_softmax(teacher_logits / temperature, dim=1)
    kl = nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def scrub_from_teacher(model: nn.Module, teacher: nn.Module, retain: ArrayData, forget: ArrayData,
                       settings: UnlearnConfig) -> nn.Module:
    """SCRUB with the teacher given (federated rounds pass the model of the phase's start): a max pass over
    `forget` in the first `scrub_max_epochs` epochs (skipped when `forget` is empty), then a min pass over
    `retain`, every epoch. `model` and `teacher` are left unchanged."""
    work, device, generator = prepare(model, settings)
    frozen = prepare(teacher, settings)[0].eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    trainer = Trainer(work, settings, mask=settings.mask)
    temperature = settings.scrub_temperature
    for epoch in range(settings.epochs):
        if epoch < settings.scrub_max_epochs and len(forget):
            for xb, _ in batches(forget, settings.batch_size, generator, device):
                with torch.no_grad():
                    target = frozen(xb)
                trainer.step(-distillation_kl(work(xb), target, temperature))
        for xb, yb in batches(retain, settings.batch_size, generator, device):
            with torch.no_grad():
                target = frozen(xb)
            out = work(xb)
            loss = (settings.scrub_gamma * nn.functional.cross_entropy(out, yb)
                    + settings.scrub_alpha * distillation_kl(out, target, temperature))
            trainer.step(loss)
        trainer.end_epoch()
    return work.eval()


def scrub(model: nn.Module, retain: ArrayData, forget: ArrayData, cfg: UnlearnConfig) -> nn.Module:
    """SCRUB's min-max distillation for `epochs` epochs (on `cfg.mask` only, if set), the original model being
    its own teacher."""
    return scrub_from_teacher(model, model, retain, forget, cfg)
