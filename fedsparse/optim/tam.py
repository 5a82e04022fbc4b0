"""TAM: SGD with torque-aware momentum (Malviya et al., arXiv:2412.18790).

    g_t = grad + weight_decay * p                  (L2, as in torch.optim.SGD)
    m_t = g_1 at the first step, else momentum * m_{t-1} + (eps + d_t) * g_t
    p  <- p - lr * m_t

with the damping d_t of `fedsparse.optim.torque` (the real cosine between g_t and m_{t-1}, smoothed by
`decay_rate`). When every gradient is parallel to the momentum, d_t = 1 and TAM is exactly torch.optim.SGD with the
same momentum and dampening 0 (float32 absorbs the default eps = 1e-8 next to 1). Gradients with a None grad are
skipped; sparse ones are densified.
"""

from __future__ import annotations

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


class TAM(torch.optim.Optimizer):
    """Torque-aware momentum SGD.

    Args:
        params: parameters or parameter groups, as for any torch optimiser.
        lr: learning rate (>= 0).
        momentum: momentum factor beta, in [0, 1).
        decay_rate: smoothing of the cosine, in [0, 1] (0 = use each step's cosine as it is).
        eps: minimum share of a gradient that enters the momentum, >= 0.
        weight_decay: L2 penalty added to the gradient, >= 0.
        cosine: "tensor" (one cosine per parameter tensor) or "global" (one over all tensors of a group).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9, decay_rate: float = 0.9,
                 eps: float = 1e-8, weight_decay: float = 0.0, cosine: str = "tensor") -> None:
        check_non_negative("lr", lr)
        check_range("momentum", momentum, 0.0, 1.0)
        check_range("decay_rate", decay_rate, 0.0, 1.0, high_open=False)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        check_cosine_scope(cosine)
        defaults = {"lr": lr, "momentum": momentum, "decay_rate": decay_rate, "eps": eps,
                    "weight_decay": weight_decay, "cosine": cosine}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [dense_gradient(p) for p in params]
            if group["weight_decay"] != 0:
                grads = [g.add(p, alpha=group["weight_decay"]) for p, g in zip(params, grads, strict=True)]
            started = [i for i, p in enumerate(params) if "momentum_buffer" in self.state[p]]
            cosines = cosine_similarities([self.state[params[i]]["momentum_buffer"] for i in started],
                                          [grads[i] for i in started], group["cosine"])
            for i, cosine in zip(started, cosines, strict=True):
                state, grad = self.state[params[i]], grads[i]
                factor = update_damping(state, cosine, group["decay_rate"], group["eps"], grad.dtype)
                state["momentum_buffer"].mul_(group["momentum"]).addcmul_(grad, factor)
            for param, grad in zip(params, grads, strict=True):
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                    start_damping(state, param)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss
