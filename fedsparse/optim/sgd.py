"""Plain SGD (optionally with momentum): torch.optim.SGD's interface and arithmetic, without torch._dynamo.

Why it exists: `torch.optim.SGD.step` is wrapped by torch's `_use_grad_for_differentiable`, which runs
`import torch._dynamo` on every call, and `Optimizer.__init__` (through `add_param_group`), `zero_grad`,
`state_dict` and `load_state_dict` carry `@torch._disable_dynamo`, which imports it on the first call. In a
deployment Flower 1.42 starts a fresh `flwr-clientapp` process per message, so every train message paid that
import: 1.6-1.8 CPU seconds measured (README, "Where a deployed round goes"). No method of `SGD` imports
torch._dynamo: `step` and `zero_grad` are written here, and `add_param_group`, `state_dict` and
`load_state_dict` call torch's own code without its `_disable_dynamo` wrapper (only dynamo's tracing needs it).

Invariant: `step` is torch.optim.SGD's single-tensor algorithm (`foreach=False`, torch's choice on CPU) operation
for operation, so parameters, momentum buffers and the state dict are bit-identical to torch.optim.SGD's on CPU.
Per parameter p with gradient g (parameters whose `grad` is None are skipped and get no state):

    g <- -g if maximize;  g <- g + weight_decay * p if weight_decay != 0
    if momentum != 0:  b <- clone(g) on the first step, else b <- momentum * b + (1 - dampening) * g
                       g <- g + momentum * b if nesterov else b
    p <- p - lr * g

`state[p]["momentum_buffer"]` holds b, as in torch.optim.SGD, so state dicts load into either class. Not
supported: tensor-valued lr or weight decay, `foreach`/`fused` kernels, `differentiable` (use torch.optim.SGD).
On CUDA torch.optim.SGD defaults to its foreach kernels; this class always runs the single-tensor loop.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["SGD"]


def _without_dynamo_wrapper(method: Callable[..., Any]) -> Callable[..., Any]:
    """The function under torch's `@torch._disable_dynamo` (which sets `__wrapped__`), else `method` itself."""
    return getattr(method, "__wrapped__", method)


def _check_number(name: str, value: Any, *, non_negative: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")  # noqa: TRY004
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov momentum, L2 weight decay and
    maximisation: the arguments, defaults and results of torch.optim.SGD(..., foreach=False)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False) -> None:
        _check_number("lr", lr, non_negative=True)
        _check_number("momentum", momentum, non_negative=True)
        _check_number("dampening", dampening, non_negative=False)
        _check_number("weight_decay", weight_decay, non_negative=True)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Nesterov momentum requires a momentum > 0 and zero dampening, got "
                             f"momentum={momentum}, dampening={dampening}")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                    "nesterov": bool(nesterov), "maximize": bool(maximize)}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore (pickle, `load_state_dict`); groups saved without nesterov/maximize get False, as in torch."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (torch's checks and defaults, without importing torch._dynamo)."""
        _without_dynamo_wrapper(Optimizer.add_param_group)(self, param_group)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict (`state`, `param_groups`), without importing torch._dynamo."""
        return _without_dynamo_wrapper(Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of torch.optim.SGD, without importing torch._dynamo."""
        _without_dynamo_wrapper(Optimizer.load_state_dict)(self, state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's gradient (`set_to_none`, the default) or zero it in place, as torch does."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                    continue
                if param.grad.grad_fn is not None:
                    param.grad.detach_()
                else:
                    param.grad.requires_grad_(False)
                param.grad.zero_()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient (module docstring); returns `closure()`'s loss,
        evaluated with gradients enabled before the update, or None without a closure."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                self._update_group(group)
        return loss

    def _update_group(self, group: dict[str, Any]) -> None:
        lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
        weight_decay, nesterov, maximize = group["weight_decay"], group["nesterov"], group["maximize"]
        for param in group["params"]:
            if param.grad is None:
                continue
            grad = -param.grad if maximize else param.grad
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            if momentum != 0:
                state = self.state[param]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = grad.detach().clone()
                    state["momentum_buffer"] = buffer
                else:
                    buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
                grad = grad.add(buffer, alpha=momentum) if nesterov else buffer
            param.add_(grad, alpha=-lr)
