"""Continual learning as functions over models, tensors and state dicts (no Flower needed).

- `streams`: `Task` and the stream builders (diverse domains, split and permuted Fashion-MNIST).
- `sfa`: SFA's averaging step, its schedule, a client-side after-step callback and the server-side round variant.
- `penalties`: L2 / EWC quadratic penalties toward an anchor, the diagonal Fisher and its aggregation.
- `replay`: a bounded, seeded per-client buffer of past-task examples.
- `metrics`: accuracy matrix metrics (average accuracy, forgetting, backward transfer), CSV and heat map.
- `merge_after_task`: the "merge after each task" baselines (Task Arithmetic, TIES, WiSE-FT) as a `TaskMerger`.
- `driver`: `run_stream`, a centralised trainer through a stream with one method.
- `procedure`: the local training procedure of each method in a federated run (data, objective, callbacks) and
  what a client keeps between rounds (anchor, Fisher, replay index).
"""

from fedsparse.continual.driver import (
    METHODS,
    EpochAccuracy,
    StreamConfig,
    StreamResult,
    run_stream,
    steps_per_task,
    train_task,
)
from fedsparse.continual.merge_after_task import MERGE_AFTER_TASK_METHODS, TaskMergeConfig, TaskMerger
from fedsparse.continual.metrics import (
    ContinualSummary,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    plot_matrix,
    summarize,
    write_matrix_csv,
)
from fedsparse.continual.penalties import (
    FisherEstimate,
    QuadraticPenalty,
    aggregate_fishers,
    estimate_fisher,
    ewc_penalty,
    l2_penalty,
)
from fedsparse.continual.procedure import (
    FEDERATED_METHODS,
    ContinualClientState,
    LocalProcedure,
    MethodSettings,
    ReplayIndex,
    local_procedure,
)
from fedsparse.continual.replay import ReplayBuffer, with_replay
from fedsparse.continual.sfa import ServerSFA, SFACallback, SFAConfig, SFASchedule, average_model_, sfa_average
from fedsparse.continual.streams import Task, domain_stream, partition_task, permuted_stream, split_stream

__all__ = [
    "FEDERATED_METHODS",
    "MERGE_AFTER_TASK_METHODS",
    "METHODS",
    "ContinualClientState",
    "ContinualSummary",
    "EpochAccuracy",
    "FisherEstimate",
    "LocalProcedure",
    "MethodSettings",
    "QuadraticPenalty",
    "ReplayBuffer",
    "ReplayIndex",
    "SFACallback",
    "SFAConfig",
    "SFASchedule",
    "ServerSFA",
    "StreamConfig",
    "StreamResult",
    "Task",
    "TaskMergeConfig",
    "TaskMerger",
    "aggregate_fishers",
    "average_accuracy",
    "average_forgetting",
    "average_model_",
    "backward_transfer",
    "domain_stream",
    "estimate_fisher",
    "ewc_penalty",
    "l2_penalty",
    "local_procedure",
    "partition_task",
    "permuted_stream",
    "plot_matrix",
    "run_stream",
    "sfa_average",
    "split_stream",
    "steps_per_task",
    "summarize",
    "train_task",
    "with_replay",
    "write_matrix_csv",
]
