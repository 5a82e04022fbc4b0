"""Permutation alignment and linear mode connectivity: permutation specs for `fedsparse.models` (mlp, cnn,
GroupNorm resnet18), weight and activation matching, 2-model and k-model (simplex) barriers, and REPAIR.

All functions work on state dicts and `nn.Module`s without Flower; see each submodule for its invariants.
"""

from fedsparse.alignment.barriers import (
    BarrierResult,
    Evaluation,
    Evaluator,
    dataset_evaluator,
    linear_barrier,
    reset_batchnorm_statistics,
    simplex_barrier,
    simplex_grid,
)
from fedsparse.alignment.matching import WeightMatchingResult, activation_matching, assign, weight_matching
from fedsparse.alignment.repair import RepairResult, interpolated_targets, repair
from fedsparse.alignment.spec import (
    SPEC_BUILDERS,
    Permutation,
    PermutationSpec,
    apply_permutation,
    check_permutation,
    identity_permutation,
    invert_permutation,
    permutation_spec,
    random_permutation,
)

__all__ = [
    "SPEC_BUILDERS", "BarrierResult", "Evaluation", "Evaluator", "Permutation", "PermutationSpec", "RepairResult",
    "WeightMatchingResult", "activation_matching", "apply_permutation", "assign", "check_permutation",
    "dataset_evaluator", "identity_permutation", "interpolated_targets", "invert_permutation", "linear_barrier",
    "permutation_spec", "random_permutation", "repair", "reset_batchnorm_statistics", "simplex_barrier",
    "simplex_grid", "weight_matching",
]
