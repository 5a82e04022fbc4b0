"""Model merging over state dicts: task vectors, one general task-vector merge (Task Arithmetic, TIES, DARE-TA,
DARE-TIES as named settings in `MERGE_METHODS`), WiSE-FT, TALL masks and consensus merging, scale selection on
validation data, and TACT (per-task activation-statistics correction for non-local merging).

Everything works on plain `state_dict()`s and `nn.Module`s, without Flower; see each submodule for its invariants.
"""

from fedsparse.merging.merge import (
    MERGE_METHODS,
    MergeSettings,
    ScaleChoice,
    choose_scale,
    consensus_mask,
    consensus_merge,
    dare_drop,
    elect_signs,
    magnitude_trim,
    merge_models,
    merge_task_vectors,
    resolve_settings,
    tall_masks,
    tall_reconstruct,
)
from fedsparse.merging.state import (
    MergeError,
    StateDict,
    TaskVector,
    apply_task_vector,
    interpolate,
    task_vector,
    weighted_average,
    wise_ft,
)
from fedsparse.merging.statistics import ChannelAffine, ChannelStats, fit_corrections, record_channel_stats
from fedsparse.merging.tact import TACTModel, expert_statistics

__all__ = [
    "MERGE_METHODS", "ChannelAffine", "ChannelStats", "MergeError", "MergeSettings", "ScaleChoice", "StateDict",
    "TACTModel", "TaskVector", "apply_task_vector", "choose_scale", "consensus_mask", "consensus_merge", "dare_drop",
    "elect_signs", "expert_statistics", "fit_corrections", "interpolate", "magnitude_trim", "merge_models",
    "merge_task_vectors", "record_channel_stats", "resolve_settings", "tall_masks", "tall_reconstruct", "task_vector",
    "weighted_average", "wise_ft",
]
