"""Optimisers for local training, by name: the registry that `TrainConfig.optimizer` and the `optimizer` run-config
key choose from.

Every builder takes the same three knobs of the run config, `lr`, `momentum` and `weight_decay`, plus optional
extra keyword arguments passed to the optimiser:

- `sgd`: `fedsparse.optim.sgd.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)`: torch.optim.SGD's
  arithmetic (the single-tensor loop torch uses on CPU) without importing torch._dynamo, which costs a deployed
  ClientApp 1.6-1.8 CPU s per message; bit-identical on CPU to the torch.optim.SGD call local training made before,
  so the SGD path stays bit-identical.
- `adam`: torch.optim.Adam with betas (momentum, 0.999) and L2 weight decay.
- `tam`: TAM with momentum `momentum`; `adatam`, `adatamw`: AdaTAM/AdaTAMW with betas (momentum, 0.999).

So `momentum` is beta1 for the Adam family: set it (e.g. 0.9) when choosing one of those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from fedsparse.optim.adatam import AdaTAM
from fedsparse.optim.adatamw import AdaTAMW
from fedsparse.optim.sgd import SGD
from fedsparse.optim.tam import TAM

__all__ = ["OPTIMIZERS", "SGD", "TAM", "AdaTAM", "AdaTAMW", "build_optimizer"]

OptimizerBuilder = Callable[..., torch.optim.Optimizer]


def _sgd(params: Iterable[Any], *, lr: float, momentum: float, weight_decay: float, **extra: Any
         ) -> torch.optim.Optimizer:
    return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **extra)


def _adam(params: Iterable[Any], *, lr: float, momentum: float, weight_decay: float, **extra: Any
          ) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, **extra)


def _tam(params: Iterable[Any], *, lr: float, momentum: float, weight_decay: float, **extra: Any
         ) -> torch.optim.Optimizer:
    return TAM(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **extra)


def _adatam(params: Iterable[Any], *, lr: float, momentum: float, weight_decay: float, **extra: Any
            ) -> torch.optim.Optimizer:
    return AdaTAM(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, **extra)


def _adatamw(params: Iterable[Any], *, lr: float, momentum: float, weight_decay: float, **extra: Any
             ) -> torch.optim.Optimizer:
    return AdaTAMW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, **extra)


OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "sgd": _sgd,
    "adam": _adam,
    "tam": _tam,
    "adatam": _adatam,
    "adatamw": _adatamw,
}


def build_optimizer(name: str, params: Iterable[Any], *, lr: float, momentum: float, weight_decay: float,
                    **extra: Any) -> torch.optim.Optimizer:
    """The optimiser registered as `name` over `params`; ValueError listing the registry's names if unknown."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, momentum=momentum, weight_decay=weight_decay, **extra)
