"""AdaTAMW: AdaTAM with decoupled weight decay, as AdamW is to Adam.

Before each update the weights shrink, p <- p * (1 - lr * weight_decay), and the gradient carries no L2 term, so
the decay neither enters the momentum nor the cosine. In the parallel-gradient limit with `bias_correction=True`
it is torch.optim.AdamW up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedsparse.optim.adatam import AdaTAM


class AdaTAMW(AdaTAM):
    """Torque-aware AdamW; the arguments are AdaTAM's, with torch.optim.AdamW's default weight_decay of 0.01."""

    decoupled_weight_decay = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 decay_rate: float = 0.9, eps: float = 1e-8, weight_decay: float = 1e-2, cosine: str = "tensor",
                 bias_correction: bool = False) -> None:
        super().__init__(params, lr=lr, betas=betas, decay_rate=decay_rate, eps=eps, weight_decay=weight_decay,
                         cosine=cosine, bias_correction=bias_correction)
