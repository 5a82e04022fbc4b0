"""One general task-vector merge with pluggable steps; Task Arithmetic, TIES, DARE are named settings of it.

The pipeline, applied to task vectors `tau_1..tau_T` (see `state.task_vector`), in this order:

1. **sparsify** each task vector on its own:
   - `none`;
   - `magnitude`: keep the `density` fraction of entries with the largest |value| (TIES "trim"), either over the
     whole flattened vector of the task (`scope="global"`, as the TIES paper) or tensor by tensor
     (`scope="tensor"`, as mergekit); the rest become 0;
   - `dare`: keep each entry independently with probability `density` (= 1 - drop rate p) and divide the kept ones
     by `density`, so that the expectation of every entry is unchanged. Seeded: task t draws from a generator
     seeded with `seed + t`, tensors in key order, so a merge is reproducible.
2. **sign consensus**: `none`, or `ties`: the elected sign is `sign(sum_t tau_t)` per entry (mass election);
   where that sum is exactly 0, the sign of the sum of all elected signs (the majority) is used. Entries whose sign
   disagrees with the elected sign are set to 0.
3. **aggregate**: `sum` (Task Arithmetic), `mean` (divide by T), or `disjoint_mean` (divide each entry by the
   number of tasks whose entry is non-zero after steps 1-2; 0 where there is none).
4. **scale**: `merged = base + scale * aggregate`.

`MERGE_METHODS` maps names to settings. TALL masks and consensus merging (Wang et al. 2024) build on the same
multi-task vector; `choose_scale` picks `scale` (or any knob) on held-out validation data through a callback.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from fedsparse.merging.state import MergeError, StateDict, TaskVector, apply_task_vector, task_vector

Sparsify = Literal["none", "magnitude", "dare"]
SignConsensus = Literal["none", "ties"]
Aggregate = Literal["sum", "mean", "disjoint_mean"]


@dataclass(frozen=True)
class MergeSettings:
    """The steps of a task-vector merge (see the module docstring).

    `density` is the kept fraction for `magnitude` and the keep probability (1 - drop rate) for `dare`; it is
    ignored for `sparsify="none"`. `scope` applies to `magnitude` only. `scale` is lambda in
    `base + lambda * merged_vector`.
    """

    sparsify: Sparsify = "none"
    density: float = 1.0
    scope: Literal["global", "tensor"] = "global"
    sign_consensus: SignConsensus = "none"
    aggregate: Aggregate = "sum"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.sparsify not in ("none", "magnitude", "dare"):
            raise ValueError(f"sparsify must be none | magnitude | dare, got '{self.sparsify}'")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.scope not in ("global", "tensor"):
            raise ValueError(f"scope must be global | tensor, got '{self.scope}'")
        if self.sign_consensus not in ("none", "ties"):
            raise ValueError(f"sign_consensus must be none | ties, got '{self.sign_consensus}'")
        if self.aggregate not in ("sum", "mean", "disjoint_mean"):
            raise ValueError(f"aggregate must be sum | mean | disjoint_mean, got '{self.aggregate}'")


MERGE_METHODS: dict[str, MergeSettings] = {
    # Task Arithmetic: base + lambda * sum of task vectors; lambda 0.3 is FusionBench's default (choose on validation).
    "task_arithmetic": MergeSettings(scale=0.3),
    # Plain average of the experts (a model soup): base + mean of task vectors.
    "average": MergeSettings(aggregate="mean"),
    # TIES: trim to the top 20% per task (whole vector), elect signs by mass, disjoint mean, lambda 1.
    "ties": MergeSettings(sparsify="magnitude", density=0.2, sign_consensus="ties", aggregate="disjoint_mean"),
    # DARE + Task Arithmetic: drop half of each task vector, rescale by 2, sum.
    "dare_ta": MergeSettings(sparsify="dare", density=0.5, scale=0.3),
    # DARE + TIES: DARE drop instead of magnitude trim, then TIES elect and disjoint mean.
    "dare_ties": MergeSettings(sparsify="dare", density=0.5, sign_consensus="ties", aggregate="disjoint_mean"),
}


def resolve_settings(method: str | MergeSettings, **overrides: float | str) -> MergeSettings:
    """Settings from a `MERGE_METHODS` name (or settings as they are), with fields overridden by keyword."""
    if isinstance(method, str):
        if method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method '{method}'; known: {', '.join(MERGE_METHODS)}")
        method = MERGE_METHODS[method]
    return replace(method, **overrides) if overrides else method


def magnitude_trim(vector: TaskVector, density: float, scope: Literal["global", "tensor"] = "global") -> TaskVector:
    """Keep the `round(density * n)` entries with the largest |value| (at least one), n counted over the whole
    vector (`global`) or per tensor (`tensor`); zero the rest."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density == 1.0:
        return {key: value.clone() for key, value in vector.items()}
    if scope == "tensor":
        return {key: _keep_top(value.flatten(), density).view_as(value) for key, value in vector.items()}
    if scope != "global":
        raise ValueError(f"scope must be global | tensor, got '{scope}'")
    keys = list(vector)
    flat = torch.cat([vector[key].flatten() for key in keys]) if keys else torch.zeros(0)
    kept = _keep_top(flat, density)
    result, start = {}, 0
    for key in keys:
        size = vector[key].numel()
        result[key] = kept[start:start + size].view_as(vector[key])
        start += size
    return result


def _keep_top(flat: torch.Tensor, density: float) -> torch.Tensor:
    if flat.numel() == 0:
        return flat.clone()
    count = max(1, round(density * flat.numel()))
    kept = torch.zeros_like(flat)
    index = flat.abs().topk(count).indices
    kept[index] = flat[index]
    return kept


def dare_drop(vector: TaskVector, keep_probability: float, generator: torch.Generator) -> TaskVector:
    """DARE: keep each entry with probability `keep_probability`, divide kept entries by it (E[result] = vector).
    Draws from `generator`, tensors in key order."""
    if not 0.0 < keep_probability <= 1.0:
        raise ValueError(f"keep_probability must be in (0, 1], got {keep_probability}")
    result = {}
    for key, value in vector.items():
        keep = torch.rand(value.shape, generator=generator) < keep_probability
        result[key] = torch.where(keep, value / keep_probability, torch.zeros_like(value))
    return result


def elect_signs(vectors: Sequence[TaskVector]) -> dict[str, torch.Tensor]:
    """TIES mass election: `sign(sum_t tau_t)` per entry; exact zeros of the sum take the majority sign, i.e. the
    sign of the sum of all elected signs over the whole model (+1 if that is 0 too)."""
    elected = {key: torch.sign(sum(vector[key] for vector in vectors)) for key in vectors[0]}
    total = sum(float(sign.sum()) for sign in elected.values())
    majority = -1.0 if total < 0 else 1.0
    return {key: torch.where(sign == 0, torch.full_like(sign, majority), sign) for key, sign in elected.items()}


def merge_task_vectors(vectors: Sequence[TaskVector], settings: MergeSettings, seed: int = 0) -> TaskVector:
    """Steps 1-3 of the module docstring (sparsify, sign consensus, aggregate); the scale is not applied."""
    if len(vectors) == 0:
        raise ValueError("need at least one task vector")
    keys = list(vectors[0])
    for index, vector in enumerate(vectors[1:], start=1):
        if list(vector) != keys:
            raise MergeError(f"task vector {index} has other keys than task vector 0")
    if settings.sparsify == "magnitude":
        vectors = [magnitude_trim(vector, settings.density, settings.scope) for vector in vectors]
    elif settings.sparsify == "dare":
        vectors = [dare_drop(vector, settings.density, torch.Generator().manual_seed(seed + index))
                   for index, vector in enumerate(vectors)]
    if settings.sign_consensus == "ties":
        elected = elect_signs(vectors)
        vectors = [{key: torch.where(torch.sign(value) == elected[key], value, torch.zeros_like(value))
                    for key, value in vector.items()} for vector in vectors]
    merged = {}
    for key in keys:
        stacked = torch.stack([vector[key] for vector in vectors])
        total = stacked.sum(0)
        if settings.aggregate == "sum":
            merged[key] = total
        elif settings.aggregate == "mean":
            merged[key] = total / len(vectors)
        else:
            contributors = (stacked != 0).sum(0)
            merged[key] = torch.where(contributors > 0, total / contributors.clamp(min=1), torch.zeros_like(total))
    return merged


def merge_models(base: StateDict, experts: Sequence[StateDict], method: str | MergeSettings = "task_arithmetic",
                 *, scale: float | None = None, seed: int = 0, exclude: Collection[str] = ()) -> StateDict:
    """Merge `experts` (state dicts fine-tuned from `base`) with a `MERGE_METHODS` name or `MergeSettings`.

    `scale` overrides the settings' lambda. Keys under a prefix in `exclude` (e.g. per-task heads) are not merged
    and keep the base's values. Non-float entries must be equal across all models (`MergeError` otherwise).
    """
    settings = resolve_settings(method)
    vectors = [task_vector(expert, base, exclude) for expert in experts]
    merged = merge_task_vectors(vectors, settings, seed)
    return apply_task_vector(base, merged, settings.scale if scale is None else scale)


def tall_masks(base: StateDict, experts: Sequence[StateDict], multi_task_vector: TaskVector | None = None,
               thresholds: float | Sequence[float] = 0.4, exclude: Collection[str] = ()) -> list[dict[str, torch.Tensor]]:
    """TALL masks: per task t, `m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|` elementwise (boolean), where
    `tau_MTL` defaults to the Task Arithmetic sum of all task vectors and `thresholds` is one lambda for all tasks
    or one per task."""
    vectors = [task_vector(expert, base, exclude) for expert in experts]
    if multi_task_vector is None:
        multi_task_vector = merge_task_vectors(vectors, MergeSettings())
    if isinstance(thresholds, float | int):
        thresholds = [float(thresholds)] * len(vectors)
    if len(thresholds) != len(vectors):
        raise ValueError(f"need one threshold per task ({len(vectors)}), got {len(thresholds)}")
    return [{key: value.abs() > threshold * (multi_task_vector[key] - value).abs() for key, value in vector.items()}
            for vector, threshold in zip(vectors, thresholds, strict=True)]


def tall_reconstruct(base: StateDict, multi_task_vector: TaskVector, mask: dict[str, torch.Tensor]) -> StateDict:
    """The task-specific model `base + mask * tau_MTL` that a TALL mask recovers."""
    return apply_task_vector(base, {key: value * mask[key] for key, value in multi_task_vector.items()})


def consensus_mask(masks: Sequence[dict[str, torch.Tensor]], min_tasks: int = 2) -> dict[str, torch.Tensor]:
    """Entries that at least `min_tasks` TALL masks keep (drops "catastrophic" and "selfish" weights)."""
    if min_tasks < 0:
        raise ValueError(f"min_tasks must be >= 0, got {min_tasks}")
    return {key: sum(mask[key].int() for mask in masks) >= min_tasks for key in masks[0]}


def consensus_merge(base: StateDict, experts: Sequence[StateDict], method: str | MergeSettings = "task_arithmetic",
                    *, min_tasks: int = 2, threshold: float = 0.4, scale: float | None = None, seed: int = 0,
                    exclude: Collection[str] = ()) -> StateDict:
    """Consensus merging: the multi-task vector of `method` (scale not applied) restricted to the entries kept by at
    least `min_tasks` TALL masks, then `base + scale * that` (`scale` defaults to the method's)."""
    settings = resolve_settings(method)
    vectors = [task_vector(expert, base, exclude) for expert in experts]
    multi_task = merge_task_vectors(vectors, settings, seed)
    masks = tall_masks(base, experts, multi_task, threshold, exclude)
    keep = consensus_mask(masks, min_tasks)
    return apply_task_vector(base, {key: value * keep[key] for key, value in multi_task.items()},
                             settings.scale if scale is None else scale)


@dataclass(frozen=True)
class ScaleChoice:
    """The grid value with the best validation score, its score, and every (value, score) evaluated."""

    best: float
    best_score: float
    scores: tuple[tuple[float, float], ...]


def choose_scale(build: Callable[[float], StateDict], score: Callable[[StateDict], float],
                 grid: Iterable[float]) -> ScaleChoice:
    """Evaluate `score(build(value))` (higher is better, e.g. validation accuracy) for every value of `grid` and
    return the best; ties go to the first value. Example: `build=lambda s: merge_models(base, experts, "ties",
    scale=s)`, grid 0.1..1.0."""
    scores = tuple((float(value), float(score(build(value)))) for value in grid)
    if not scores:
        raise ValueError("grid is empty")
    best, best_score = max(scores, key=lambda pair: pair[1])
    return ScaleChoice(best, best_score, scores)
