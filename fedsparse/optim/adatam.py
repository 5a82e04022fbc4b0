"""AdaTAM: Adam with torque-aware momentum (Malviya et al., arXiv:2412.18790; merging.md B.1).

    g_t = grad + weight_decay * p                  (L2, as in torch.optim.Adam; AdaTAMW decays p instead)
    m_t = g_1 at the first step, else beta1 * m_{t-1} + (eps + d_t) * g_t      (a damped sum, not an average)
    v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
    p  <- p - lr * m_t / (sqrt(v_t) + eps)

with the damping d_t of `fedsparse.optim.torque`. As in the reference formulas there is no bias correction by
default; `bias_correction=True` divides m_t by (1 - beta1^t) / (1 - beta1) and v_t by (1 - beta2^t).

The Adam limit: while gradients stay parallel to the momentum, d_t = 1 and m_t = A_t / (1 - beta1) where A_t is
Adam's moving average, so with `bias_correction=True` AdaTAM is torch.optim.Adam (same lr, betas, eps) up to
float rounding, and without it Adam minus its bias correction at lr / (1 - beta1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fedsparse.optim.torque import (
    check_cosine_scope,
    check_non_negative,
    check_range,
    cosine_similarities,
    dense_gradient,
    start_damping,
    update_damping,
)


class AdaTAM(torch.optim.Optimizer):
    """Torque-aware Adam with L2 weight decay (see AdaTAMW for decoupled decay).

    Args:
        params: parameters or parameter groups, as for any torch optimiser.
        lr: learning rate (>= 0).
        betas: (beta1, beta2), each in [0, 1); beta1 is the momentum factor of the damped sum.
        decay_rate: smoothing of the cosine, in [0, 1].
        eps: minimum share of a gradient that enters the momentum, and the denominator's guard; >= 0.
        weight_decay: >= 0; added to the gradient here, applied to the weights by AdaTAMW.
        cosine: "tensor" (one cosine per parameter tensor) or "global" (one over all tensors of a group).
        bias_correction: divide the moments by their bias as Adam does (off in the reference formulas).
    """

    decoupled_weight_decay = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 decay_rate: float = 0.9, eps: float = 1e-8, weight_decay: float = 0.0, cosine: str = "tensor",
                 bias_correction: bool = False) -> None:
        check_non_negative("lr", lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_range("betas[0]", betas[0], 0.0, 1.0)
        check_range("betas[1]", betas[1], 0.0, 1.0)
        check_range("decay_rate", decay_rate, 0.0, 1.0, high_open=False)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        check_cosine_scope(cosine)
        defaults = {"lr": lr, "betas": tuple(betas), "decay_rate": decay_rate, "eps": eps,
                    "weight_decay": weight_decay, "cosine": cosine, "bias_correction": bool(bias_correction)}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            grads = [dense_gradient(p) for p in params]
            if weight_decay != 0 and not self.decoupled_weight_decay:
                grads = [g.add(p, alpha=weight_decay) for p, g in zip(params, grads, strict=True)]
            started = [i for i, p in enumerate(params) if "momentum" in self.state[p]]
            cosines = cosine_similarities([self.state[params[i]]["momentum"] for i in started],
                                          [grads[i] for i in started], group["cosine"])
            for i, cosine in zip(started, cosines, strict=True):
                state, grad = self.state[params[i]], grads[i]
                factor = update_damping(state, cosine, group["decay_rate"], group["eps"], grad.dtype)
                state["momentum"].mul_(beta1).addcmul_(grad, factor)
            for param, grad in zip(params, grads, strict=True):
                state = self.state[param]
                if "momentum" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["momentum"] = torch.clone(grad).detach()
                    state["second_moment"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    start_damping(state, param)
                state["step"] += 1
                state["second_moment"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                if self.decoupled_weight_decay and weight_decay != 0:
                    param.mul_(1.0 - lr * weight_decay)
                step_size, denominator = lr, state["second_moment"].sqrt()
                if group["bias_correction"]:
                    step = float(state["step"])
                    step_size = lr * (1.0 - beta1) / (1.0 - beta1**step)
                    denominator = denominator / math.sqrt(1.0 - beta2**step)
                param.addcdiv_(state["momentum"], denominator.add_(group["eps"]), value=-step_size)
        return loss
