"""A centralised continual-learning driver: train one model through a task stream with one method and return the
accuracy matrix. The same pieces (penalties, SFA callbacks, replay buffers) are what a federated client procedure
calls; this driver is the paper's setting (one learner holding all data) without Flower.

Methods (`METHODS`):
- `finetune`: plain training on each task in turn.
- `sfa`: after-step averaging with the previous task's final model (`SFACallback`; schedule over the task's
  optimiser steps; the first task is averaged only if `SFAConfig.average_first_task`).
- `l2`: cross-entropy + lambda/2 ||theta - theta_prev||^2 from the second task on.
- `ewc`: cross-entropy + lambda/2 sum F (theta - theta_prev)^2, F the accumulated empirical Fisher of past tasks.
- `replay`: each task trained on its data plus the whole replay buffer of past-task examples.
- `merge-ta`, `merge-ties`, `wise-ft`: fine-tuning, and at every task's end (from the second on) the model becomes
  the merge of `merge_after_task.TaskMerger` (Task Arithmetic / TIES of the per-task models against the initial
  model, or WiSE-FT with the task's start).

Invariants:
- `train_task` is `fedsparse.train.train_local` (the federated clients' loop) with the penalty as objective: the
  same batches for the same seed, the same optimiser, so without a penalty the same weights bit for bit.
- Task i trains with seed `config.seed * 1000 + i`; row i of the matrix is measured right after task i ends (after
  SFA's end-of-task averaging, or the merge), on every task's test set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedsparse.continual.merge_after_task import MERGE_AFTER_TASK_METHODS, TaskMergeConfig, TaskMerger
from fedsparse.continual.penalties import (
    FisherEstimate,
    QuadraticPenalty,
    accumulate_fisher,
    estimate_fisher,
    ewc_penalty,
    l2_penalty,
)
from fedsparse.continual.procedure import penalty_objective
from fedsparse.continual.replay import ReplayBuffer, with_replay
from fedsparse.continual.sfa import SFACallback, SFAConfig, SFASchedule, StateDict, snapshot
from fedsparse.continual.streams import Task
from fedsparse.train import TrainConfig, evaluate, train_local

METHODS = ("finetune", "sfa", "l2", "ewc", "replay", *MERGE_AFTER_TASK_METHODS)
StepCallback = Callable[[nn.Module, int], None]  # (model, 1-based step), called after every optimiser step


def steps_per_task(num_examples: int, config: TrainConfig) -> int:
    """Optimiser steps `train_task` takes on `num_examples` examples: epochs * ceil(n / batch size)."""
    return config.epochs * math.ceil(num_examples / config.batch_size)


def train_task(model: nn.Module, x: np.ndarray, y: np.ndarray, config: TrainConfig, *, seed: int,
               penalty: QuadraticPenalty | None = None, callbacks: Sequence[StepCallback] = (),
               device: torch.device | None = None) -> float:
    """Train `model` in place on (x, y) with loss = cross-entropy + penalty(model), calling every callback after
    each optimiser step: `fedsparse.train.train_local` with the penalty as its objective. Returns the mean
    training loss (penalty included). Deterministic for `seed` on CPU."""
    objective = penalty_objective(penalty) if penalty is not None else None
    return train_local(model, x, y, config, seed=seed, device=device, objective=objective, callbacks=callbacks)


@dataclass(frozen=True)
class StreamConfig:
    """Settings of `run_stream`: local training, the seed, and each method's knobs (unused ones are ignored)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    sfa: SFAConfig = field(default_factory=SFAConfig)
    l2_strength: float = 1.0
    ewc_strength: float = 100.0
    fisher_examples: int | None = 500
    fisher_labels: str = "empirical"
    replay_capacity: int = 500
    replay_strategy: str = "reservoir"
    merge_alpha: float = 0.5  # wise-ft: weight of the newly trained model
    merge_scale: float = 0.0  # merge-ta: lambda (0 = 1 / tasks so far)
    merge_density: float = 0.2  # merge-ties: kept fraction of each task vector


@dataclass
class StreamResult:
    """What `run_stream` measured. `accuracy[i, j]`: accuracy on task j after task i (see `metrics`).

    `sfa_steps[i]`: the steps of task i after which SFA averaged (empty for other methods). With `keep_states`,
    `final_states[i]` is the model after task i and `anchors[i]` the anchor task i trained against (None if none).
    With `track_epochs`, `history` holds the accuracy on every task seen so far after each epoch."""

    accuracy: np.ndarray
    task_names: list[str]
    losses: list[float]
    sfa_steps: list[list[int]]
    final_states: list[StateDict] = field(default_factory=list)
    anchors: list[StateDict | None] = field(default_factory=list)
    history: list[EpochAccuracy] = field(default_factory=list)


@dataclass(frozen=True)
class EpochAccuracy:
    """Accuracy on each task seen so far (tasks 0..task), after `epoch` (1-based) of task `task`."""

    task: int
    epoch: int
    accuracy: tuple[float, ...]


@dataclass
class SeenTasksEvaluator:
    """After-step callback: every `steps_per_epoch` steps, evaluate on `tasks` and append to `history`; the
    model's train/eval mode is restored afterwards, so training continues as before."""

    tasks: Sequence[Task]
    task_index: int
    steps_per_epoch: int
    history: list[EpochAccuracy]
    device: torch.device

    def __call__(self, model: nn.Module, step: int) -> None:
        """Evaluate at epoch boundaries."""
        if step % self.steps_per_epoch:
            return
        was_training = model.training
        accuracy = tuple(evaluate(model, task.x_test, task.y_test, device=self.device)[1] for task in self.tasks)
        model.train(was_training)
        self.history.append(EpochAccuracy(self.task_index, step // self.steps_per_epoch, accuracy))


def run_stream(model: nn.Module, tasks: Sequence[Task], method: str, config: StreamConfig | None = None, *,
               keep_states: bool = False, track_epochs: bool = False, device: torch.device | None = None
               ) -> StreamResult:
    """Train `model` (in place) through `tasks` with `method` (one of `METHODS`); return the accuracy matrix."""
    if method not in METHODS:
        raise ValueError(f"unknown continual method {method!r}; choose one of {', '.join(METHODS)}")
    if not tasks:
        raise ValueError("the task stream is empty")
    config = config or StreamConfig()
    device = device or torch.device("cpu")
    accuracy = np.full((len(tasks), len(tasks)), np.nan)
    result = StreamResult(accuracy, [task.name for task in tasks], [], [])
    buffer = ReplayBuffer(config.replay_capacity, strategy=config.replay_strategy, seed=config.seed)
    anchor: StateDict | None = None  # the previous task's final model
    fisher: FisherEstimate | None = None
    merger = None
    if method in MERGE_AFTER_TASK_METHODS:
        merger = TaskMerger(TaskMergeConfig(method, alpha=config.merge_alpha, scale=config.merge_scale,
                                            density=config.merge_density))
    for index, task in enumerate(tasks):
        if merger is not None:
            merger.start_task({key: value.cpu() for key, value in snapshot(model).items()})
        x, y = (with_replay(task.x_train, task.y_train, buffer) if method == "replay"
                else (task.x_train, task.y_train))
        penalty: QuadraticPenalty | None = None
        callbacks: list[StepCallback] = []
        sfa_callback: SFACallback | None = None
        if method == "sfa" and (anchor is not None or config.sfa.average_first_task):
            task_anchor = anchor if anchor is not None else snapshot(model)
            sfa_callback = SFACallback(task_anchor, SFASchedule(steps_per_task(len(x), config.train), config.sfa.p),
                                       config.sfa.beta)
            callbacks.append(sfa_callback)
        elif method == "l2" and anchor is not None:
            penalty = l2_penalty(anchor, config.l2_strength)
        elif method == "ewc" and anchor is not None and fisher is not None:
            penalty = ewc_penalty(anchor, fisher, config.ewc_strength)
        if track_epochs:  # after SFA's callback: what is measured is the model training continues from
            callbacks.append(SeenTasksEvaluator(tasks[:index + 1], index, math.ceil(len(x) / config.train.batch_size),
                                                result.history, device))
        if keep_states:
            if sfa_callback is not None:
                result.anchors.append(sfa_callback.anchor)
            else:
                result.anchors.append(anchor if penalty is not None else None)
        loss = train_task(model, x, y, config.train, seed=config.seed * 1000 + index, penalty=penalty,
                          callbacks=callbacks, device=device)
        result.losses.append(loss)
        if merger is not None:
            model.load_state_dict(merger.end_task({key: value.cpu() for key, value in snapshot(model).items()}))
        result.sfa_steps.append(list(sfa_callback.averaged_at) if sfa_callback else [])
        if method == "ewc":
            estimate = estimate_fisher(model, task.x_train, task.y_train, labels=config.fisher_labels,
                                       max_examples=config.fisher_examples, seed=config.seed, device=device)
            fisher = accumulate_fisher(fisher, estimate)
        if method == "replay":
            buffer.add_task(index, task.x_train, task.y_train)
        anchor = {key: value.cpu() for key, value in snapshot(model).items()}
        if keep_states:
            result.final_states.append(anchor)
        for column, other in enumerate(tasks):
            accuracy[index, column] = evaluate(model, other.x_test, other.y_test, device=device)[1]
    return result
