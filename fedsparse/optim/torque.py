"""What TAM, AdaTAM and AdaTAMW share: argument checks, dense gradients, and the torque damping.

The damping of Torque-Aware Momentum (Malviya et al., arXiv:2412.18790; see ../shared/reference/merging.md B.1):

    S_t = <m_{t-1}, g_t> / (|m_{t-1}| |g_t|)      the real cosine between the previous momentum and the gradient
    s_t = decay_rate * s_{t-1} + (1 - decay_rate) * S_t
    d_t = (1 + s_t) / 2                            in [0, 1]
    m_t = beta * m_{t-1} + (eps + d_t) * g_t

Invariants, which the tests check exactly:
- The cosine is a real reduction (a sum over the whole tensor, or over every tensor of a parameter group with
  `cosine="global"`), computed in float64, so a gradient parallel to the momentum gives S = 1 and d = 1 exactly
  (pytorch_optimizer multiplies column-normalised tensors element-wise instead, which gives d ~ 0.5 whatever the
  alignment); opposite gives S = -1 and d = 0, so only `eps` of the gradient enters; orthogonal gives d = 1/2.
- A zero momentum or gradient has cosine 0 (no direction to compare), never NaN.
- The first step of a parameter has no momentum to compare with: its gradient enters whole (factor 1, as in
  torch.optim.SGD's first step) and `s` starts at 1, the cosine of the new momentum with that gradient. So while
  gradients stay parallel to the momentum, d stays exactly 1 at any `decay_rate`. (pytorch_optimizer starts `s`
  at 0; the paper's initial value is not known: merging.md H.)
- Per parameter the state holds `smoothed_cosine` (s) and `damping` (d) as 0-d tensors of the parameter's dtype,
  which is what `Optimizer.load_state_dict` casts them to, so a state_dict round trip resumes identically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

COSINE_SCOPES = ("tensor", "global")


def check_range(name: str, value: float, low: float, high: float, *, high_open: bool = True) -> None:
    """Raise ValueError naming `name` unless low <= value < high (or <= high with `high_open=False`)."""
    inside = low <= value < high if high_open else low <= value <= high
    if not (isinstance(value, (int, float)) and math.isfinite(value) and inside):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_non_negative(name: str, value: float) -> None:
    """Raise ValueError naming `name` unless `value` is a finite number >= 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_cosine_scope(cosine: str) -> None:
    """Raise ValueError unless `cosine` names a known scope."""
    if cosine not in COSINE_SCOPES:
        raise ValueError(f"cosine must be one of {', '.join(COSINE_SCOPES)}, got {cosine!r}")


def dense_gradient(param: torch.Tensor) -> torch.Tensor:
    """The gradient of `param` as a dense tensor (a sparse one, from `nn.Embedding(sparse=True)`, is densified:
    the momentum is dense anyway)."""
    grad = param.grad
    return grad.to_dense() if grad.is_sparse else grad


def cosine_similarities(momenta: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scope: str
                        ) -> list[torch.Tensor]:
    """Float64 0-d cosines between each momentum and its gradient: one per pair (`scope="tensor"`), or one over
    all pairs taken as a single vector, repeated for every pair (`scope="global"`). Zero vectors give 0."""
    tiny = torch.finfo(torch.float64).tiny
    dots, momentum_squares, grad_squares = [], [], []
    for momentum, grad in zip(momenta, grads, strict=True):
        momentum64 = momentum.reshape(-1).to(torch.float64)
        grad64 = grad.reshape(-1).to(torch.float64)
        dots.append(torch.dot(momentum64, grad64))
        momentum_squares.append(torch.dot(momentum64, momentum64))
        grad_squares.append(torch.dot(grad64, grad64))
    if not dots:
        return []
    if scope == "global":
        dots = [torch.stack(dots).sum()]
        momentum_squares = [torch.stack(momentum_squares).sum()]
        grad_squares = [torch.stack(grad_squares).sum()]
    cosines = [
        (dot / (momentum_sq.sqrt() * grad_sq.sqrt()).clamp_min(tiny)).clamp(-1.0, 1.0)
        for dot, momentum_sq, grad_sq in zip(dots, momentum_squares, grad_squares, strict=True)
    ]
    return cosines * len(momenta) if scope == "global" else cosines


def start_damping(state: dict, param: torch.Tensor) -> None:
    """First step of `param`: s = 1 and d = 1 (its gradient enters whole)."""
    state["smoothed_cosine"] = torch.ones((), dtype=param.dtype, device=param.device)
    state["damping"] = torch.ones((), dtype=param.dtype, device=param.device)


def update_damping(state: dict, cosine: torch.Tensor, decay_rate: float, eps: float, dtype: torch.dtype
                   ) -> torch.Tensor:
    """Smooth `cosine` into state["smoothed_cosine"], store d in state["damping"], and return the gradient's factor
    eps + d as a 0-d tensor of `dtype`."""
    smoothed = decay_rate * state["smoothed_cosine"].to(torch.float64) + (1.0 - decay_rate) * cosine
    damping = (1.0 + smoothed) / 2.0
    state["smoothed_cosine"].copy_(smoothed)
    state["damping"].copy_(damping)
    return (eps + damping).to(dtype)
