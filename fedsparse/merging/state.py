"""State-dict algebra for merging: task vectors, applying them, weighted averages of models.

Invariants:
- A *state dict* here is `dict[str, torch.Tensor]` as `nn.Module.state_dict()` returns it. Every operation
  returns new tensors and never modifies its inputs.
- Only floating-point entries take part in arithmetic. Non-float entries (integer buffers such as BatchNorm's
  `num_batches_tracked`, boolean masks) cannot be averaged meaningfully: they must be equal in every model that is
  combined, and the result carries the base model's copy. Unequal non-float entries raise `MergeError`, so a silent
  mix of, say, two different integer codebooks is impossible.
- A *task vector* holds only the float entries, `expert - base`, key for key.
- `weighted_average` computes `first + sum_i w_i (state_i - first)` (with `w_0` implicit). With equal inputs it
  returns the input bit for bit, which makes "a model with itself has barrier 0" exact.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

StateDict = dict[str, torch.Tensor]
TaskVector = dict[str, torch.Tensor]


class MergeError(ValueError):
    """Models cannot be combined; `reason` says why (missing key, shape mismatch, unequal non-float entry)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_float_entry(tensor: torch.Tensor) -> bool:
    """Whether a state-dict entry takes part in merging arithmetic (floating point dtypes only)."""
    return torch.is_floating_point(tensor)


def check_compatible(base: StateDict, others: Sequence[StateDict]) -> None:
    """Raise `MergeError` unless every state dict in `others` has the keys and shapes of `base`, and its
    non-float entries equal the base's."""
    for index, other in enumerate(others):
        if set(other) != set(base):
            missing = sorted(set(base) - set(other))
            extra = sorted(set(other) - set(base))
            raise MergeError(f"model {index} has different keys: missing {missing[:5]}, extra {extra[:5]}")
        for key, value in base.items():
            if other[key].shape != value.shape:
                raise MergeError(f"model {index}, '{key}': shape {tuple(other[key].shape)} != {tuple(value.shape)}")
            if other[key].dtype != value.dtype:
                raise MergeError(f"model {index}, '{key}': dtype {other[key].dtype} != {value.dtype}")
            if not is_float_entry(value) and not torch.equal(other[key], value):
                raise MergeError(f"model {index}, '{key}': non-float entry ({value.dtype}) differs from the base "
                                 f"model's; it cannot be averaged")


def _excluded(key: str, exclude: Collection[str]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in exclude)


def task_vector(expert: StateDict, base: StateDict, exclude: Collection[str] = ()) -> TaskVector:
    """`expert - base` over the float entries, except keys equal to or under a prefix in `exclude` (for example
    a classification head `"fc"`, which every task keeps for itself)."""
    check_compatible(base, [expert])
    return {key: expert[key] - value for key, value in base.items()
            if is_float_entry(value) and not _excluded(key, exclude)}


def apply_task_vector(base: StateDict, vector: TaskVector, scale: float = 1.0) -> StateDict:
    """`base + scale * vector` on the keys of `vector`; every other entry is a copy of the base's."""
    unknown = sorted(set(vector) - set(base))
    if unknown:
        raise MergeError(f"task vector has keys the base model lacks: {unknown[:5]}")
    merged = {key: value.clone() for key, value in base.items()}
    for key, delta in vector.items():
        if delta.shape != base[key].shape:
            raise MergeError(f"'{key}': task-vector shape {tuple(delta.shape)} != {tuple(base[key].shape)}")
        merged[key] = base[key] + scale * delta.to(base[key].dtype)
    return merged


def weighted_average(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """`sum_i weights[i] * states[i]` on float entries (weights must sum to 1), computed as
    `states[0] + sum_{i>0} weights[i] * (states[i] - states[0])` (a vertex, one weight 1 and the rest 0, returns a
    copy of that state); non-float entries from `states[0]`."""
    if len(states) == 0 or len(states) != len(weights):
        raise ValueError(f"need as many weights as states (>= 1), got {len(states)} states, {len(weights)} weights")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1, got {sum(weights)}")
    first = states[0]
    check_compatible(first, states[1:])
    if any(weight == 1.0 for weight in weights) and all(weight in (0.0, 1.0) for weight in weights):
        return {key: value.clone() for key, value in states[list(weights).index(1.0)].items()}
    result = {key: value.clone() for key, value in first.items()}
    for key, value in first.items():
        if not is_float_entry(value):
            continue
        for state, weight in zip(states[1:], weights[1:], strict=True):
            if weight != 0.0:
                result[key] = result[key] + weight * (state[key] - value)
    return result


def interpolate(state_a: StateDict, state_b: StateDict, alpha: float) -> StateDict:
    """`(1 - alpha) * state_a + alpha * state_b` (float entries; non-float entries must be equal)."""
    return weighted_average([state_a, state_b], [1.0 - alpha, alpha])


def wise_ft(zero_shot: StateDict, fine_tuned: StateDict, alpha: float = 0.5) -> StateDict:
    """WiSE-FT: the weight-space ensemble `(1 - alpha) * zero_shot + alpha * fine_tuned` over every float entry."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return interpolate(zero_shot, fine_tuned, alpha)
