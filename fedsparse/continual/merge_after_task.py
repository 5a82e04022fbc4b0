"""The "merge after each task" continual baselines: Task Arithmetic, TIES and WiSE-FT over a task stream.

Every task is trained as fine-tuning does, starting from the current merged model; when a task ends, the merger
combines its trained model theta_t with the models it kept, and the merge is the model evaluated after task t and
the one the next task starts from. With theta_0 the initial model (the model the
first task started from), tau_s = theta_s - theta_0 and m_{t-1} the merged model task t started from:

- `merge-ta` (Task Arithmetic): m_t = theta_0 + lambda * sum_{s <= t} tau_s, through
  `fedsparse.merging.merge_models(..., "task_arithmetic", scale=lambda)`. lambda is `scale`; `scale = 0` (the
  default) means lambda = 1 / t, i.e. the mean of the task vectors (the per-task models' average). A fixed
  lambda compounds here: task t starts from m_{t-1}, so tau_t contains the earlier merge, and the merged
  displacement m_t - theta_0 = (1 + lambda)(m_{t-1} - theta_0) + lambda (theta_t - m_{t-1}) grows by (1 + lambda)
  every task from the third on; with 1 / t it stays a mean.
- `merge-ties` (TIES): m_t = `merge_models(theta_0, [theta_1..theta_t], "ties")`: each task vector trimmed to its
  `density` largest-magnitude entries (whole vector), signs elected by mass, disjoint mean, lambda 1 (the
  library's TIES settings, density overridable).
- `wise-ft` (WiSE-FT): m_t = (1 - alpha) * m_{t-1} + alpha * theta_t (`fedsparse.merging.wise_ft` with the previous
  merged model as the "zero-shot" end), the WiSE-FT paper's reading of alpha: the weight of the newly fine-tuned
  model. alpha = 1 is plain fine-tuning, alpha = 0 keeps the first task's model for ever.

Invariants:
- No merge after the first task (one model is not a merge): m_1 = theta_1 for every method, as server-side SFA
  does not average the first task. From the second task on, the merge replaces the trained model.
- Only floating-point entries are merged; the others must be equal across the models (`MergeError` otherwise).
- Everything a merge needs later is in `state_dict()`: theta_0 and the per-task models theta_1..theta_t
  (Task Arithmetic, TIES) or the model the current task started from (WiSE-FT), so a resumed run merges exactly
  as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedsparse.merging import merge_models, resolve_settings, wise_ft
from fedsparse.merging.state import StateDict

MERGE_AFTER_TASK_METHODS = ("merge-ta", "merge-ties", "wise-ft")


def _copy(state: StateDict) -> StateDict:
    return {key: value.detach().clone() for key, value in state.items()}


@dataclass(frozen=True)
class TaskMergeConfig:
    """The merge of a "merge after each task" method (see the module docstring).

    `alpha`: WiSE-FT's weight of the newly trained model, in [0, 1]. `scale`: Task Arithmetic's lambda, >= 0
    (0 = 1 / number of task models). `density`: TIES's kept fraction of each task vector, in (0, 1]."""

    method: str
    alpha: float = 0.5
    scale: float = 0.0
    density: float = 0.2

    def __post_init__(self) -> None:
        if self.method not in MERGE_AFTER_TASK_METHODS:
            raise ValueError(f"unknown merge-after-task method {self.method!r}; choose one of "
                             f"{', '.join(MERGE_AFTER_TASK_METHODS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.scale < 0.0:
            raise ValueError(f"scale must be >= 0 (0 = 1 / number of tasks), got {self.scale}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


@dataclass
class TaskMerger:
    """The server's (or a centralised learner's) merge at every task's end.

    Use: `start_task(state)` when a task starts (the first call's state is theta_0); `end_task(trained)` when it
    ends, which returns the model to carry on with (the merge, or a copy of `trained` after the first task).
    `initial`, `task_start` and `task_models` are what it keeps (see `state_dict`)."""

    config: TaskMergeConfig
    initial: StateDict | None = None  # theta_0
    task_start: StateDict | None = None  # the model the current task started from (m_{t-1})
    task_models: list[StateDict] = field(default_factory=list)  # theta_1 .. theta_t as trained (merge-ta, -ties)
    tasks_done: int = 0

    @property
    def keeps_task_models(self) -> bool:
        """Whether the merge needs every per-task model (Task Arithmetic, TIES) or only the last start (WiSE-FT)."""
        return self.config.method != "wise-ft"

    def start_task(self, state: StateDict) -> None:
        """A task starts from `state`; the first task's start is theta_0."""
        if self.initial is None:
            self.initial = _copy(state)
        self.task_start = _copy(state)

    def end_task(self, trained: StateDict) -> StateDict:
        """The model after the task that trained `trained`: the merge (from the second task on), new tensors."""
        if self.initial is None or self.task_start is None:
            raise RuntimeError("TaskMerger.end_task before start_task: there is no initial model yet")
        self.tasks_done += 1
        if self.keeps_task_models:
            self.task_models.append(_copy(trained))
        return _copy(trained) if self.tasks_done == 1 else self.merge(trained)

    def merge(self, trained: StateDict) -> StateDict:
        """The merged model of the kept models (and, for WiSE-FT, `trained` with the task's start)."""
        method = self.config.method
        if method == "wise-ft":
            if self.task_start is None:
                raise RuntimeError("wise-ft: no task start to interpolate with")
            return wise_ft(self.task_start, trained, self.config.alpha)
        if method == "merge-ta":
            scale = self.config.scale or 1.0 / len(self.task_models)
            return merge_models(self.initial, self.task_models, "task_arithmetic", scale=scale)
        return merge_models(self.initial, self.task_models, resolve_settings("ties", density=self.config.density))

    def state_dict(self) -> dict[str, object]:
        """theta_0, the current task's start, the per-task models (copies) and the number of tasks ended."""
        return {"initial": None if self.initial is None else _copy(self.initial),
                "task_start": None if self.task_start is None else _copy(self.task_start),
                "task_models": [_copy(model) for model in self.task_models], "tasks_done": self.tasks_done}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what `state_dict` saved (build the merger with the same config)."""
        initial, start = state["initial"], state["task_start"]
        self.initial = None if initial is None else _copy(initial)
        self.task_start = None if start is None else _copy(start)
        self.task_models = [_copy(model) for model in state["task_models"]]
        self.tasks_done = int(state["tasks_done"])

