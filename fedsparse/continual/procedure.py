"""The local training procedure of each continual method in a federated run, as plain data and functions.

A federated client trains on the current task's data with `fedsparse.train.train_local`; a continual method changes
only three things, which `local_procedure` returns as a `LocalProcedure`:
- the data (`replay`: the client's own data of the current task plus its whole replay buffer of past-task examples),
- the objective (`l2`, `ewc`: cross-entropy + the quadratic penalty toward the anchor),
- after-step callbacks (`sfa-client`: SFA's averaging with the anchor inside local training).
`finetune`, `sfa` (server-side SFA, done on the global model by the server) and the "merge after each task"
methods `merge-ta`, `merge-ties`, `wise-ft` (the server merges at a task's end) train as plain FedAvg.

What a client keeps between messages is a `ContinualClientState`: the anchor (the previous task's final global
model, installed by the server at a task's start), the aggregated Fisher (ewc) and the replay buffer, which holds
*indices* into the client's own data of past tasks (the data are deterministic, so indices are enough).

Invariants:
- The replay buffer only ever receives a task once the client has moved on from it: `note_task` adds the task
  the client trained on last when a train message for another task arrives. So it holds only past tasks, never
  more than its capacity (`ReplayBuffer`).
- Client-side SFA counts optimiser steps over the whole task: a client's step s of round r (1-based within the
  task) is step (r - 1) * steps_per_round + s of T = rounds_per_task * steps_per_round, and the schedule averages
  every max(1, round(p T)) steps and at step T, as `SFASchedule` does. With p = 1 it averages once, at the end of
  the task's last local training, which after FedAvg equals server-side SFA with p = 1 (averaging is linear).
- With no anchor installed (the first task) every method trains as fine-tuning.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedsparse.continual.merge_after_task import MERGE_AFTER_TASK_METHODS
from fedsparse.continual.penalties import FisherEstimate, QuadraticPenalty, ewc_penalty, l2_penalty
from fedsparse.continual.replay import ReplayBuffer
from fedsparse.continual.sfa import SFACallback, SFASchedule, StateDict

FEDERATED_METHODS = ("finetune", "sfa", "sfa-client", "l2", "ewc", "replay", *MERGE_AFTER_TASK_METHODS)
ANCHOR_METHODS = ("sfa-client", "l2", "ewc")  # the methods whose clients need the anchor
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, logits, targets) -> loss
StepCallback = Callable[[nn.Module, int], None]  # (model, 1-based step) after every optimiser step


def check_method(method: str) -> str:
    """`method` if it is one of FEDERATED_METHODS, else a ValueError naming the choices."""
    if method not in FEDERATED_METHODS:
        raise ValueError(f"unknown continual method {method!r}; choose one of {', '.join(FEDERATED_METHODS)}")
    return method


@dataclass(frozen=True)
class MethodSettings:
    """The knobs of the client procedure, as the server sends them in every train message's config."""

    method: str
    penalty: float = 1.0  # lambda of the l2 / ewc penalty
    sfa_p: float = 0.25
    sfa_beta: float = 0.25
    rounds_per_task: int = 1
    replay_size: int = 200

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {self.penalty}")
        if not 0.0 < self.sfa_p <= 1.0:
            raise ValueError(f"sfa_p must be in (0, 1], got {self.sfa_p}")
        if not 0.0 <= self.sfa_beta <= 1.0:
            raise ValueError(f"sfa_beta must be in [0, 1], got {self.sfa_beta}")
        if self.rounds_per_task < 1:
            raise ValueError(f"rounds_per_task must be >= 1, got {self.rounds_per_task}")
        if self.replay_size < 1:
            raise ValueError(f"replay_size must be >= 1, got {self.replay_size}")


@dataclass
class ReplayIndex:
    """A client's replay buffer over its own past-task data: `buffer` holds (index into the task's client data,
    label, task ordinal) triples; `task_names[ordinal]` names the task. `last_task` is the task the client
    trained on most recently (not yet in the buffer)."""

    buffer: ReplayBuffer
    task_names: list[str] = field(default_factory=list)
    last_task: str | None = None

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, str | int]]:
        """(arrays, scalars) that `ReplayIndex.restore` reads back: the buffer's contents and its counters, the
        RNG state as JSON (its 128-bit integers do not fit a record's int)."""
        saved = self.buffer.state_dict()
        positions = saved["x"] if saved["x"] is not None else np.zeros(0, dtype=np.int64)
        arrays = {"positions": np.asarray(positions, dtype=np.int64), "labels": saved["y"],
                  "task-ids": saved["task_ids"]}
        scalars: dict[str, str | int] = {
            "capacity": self.buffer.capacity, "seen": int(saved["seen"]), "tasks": json.dumps(saved["tasks"]),
            "rng": json.dumps(saved["rng"]), "task-names": json.dumps(self.task_names),
            "last-task": self.last_task or "", "has-x": int(saved["x"] is not None)}
        return arrays, scalars

    @classmethod
    def restore(cls, arrays: dict[str, np.ndarray], scalars: dict[str, str | int]) -> ReplayIndex:
        """The replay index `state` described."""
        buffer = ReplayBuffer(int(scalars["capacity"]))
        buffer.load_state_dict({
            "capacity": int(scalars["capacity"]), "strategy": "reservoir",
            "x": arrays["positions"].astype(np.int64) if int(scalars["has-x"]) else None,
            "y": arrays["labels"].astype(np.int64), "task_ids": arrays["task-ids"].astype(np.int64),
            "seen": int(scalars["seen"]), "tasks": json.loads(str(scalars["tasks"])),
            "rng": json.loads(str(scalars["rng"]))})
        return cls(buffer, json.loads(str(scalars["task-names"])), str(scalars["last-task"]) or None)

    def note_task(self, task: str, past_labels: Callable[[str], np.ndarray]) -> None:
        """A train message for `task` arrived: if the client last trained on another task, that task is over
        and its examples (their positions, with labels from `past_labels(name)`) are offered to the buffer."""
        if task in self.task_names:
            raise ValueError(f"task {task!r} came back after the client moved on from it")
        if self.last_task is not None and self.last_task != task:
            labels = past_labels(self.last_task)
            self.task_names.append(self.last_task)
            self.buffer.add_task(len(self.task_names) - 1, np.arange(len(labels), dtype=np.int64), labels)
        self.last_task = task

    def examples(self, past_data: Callable[[str], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """The buffer's examples as arrays, read through `past_data(name) -> (x, y)` of each past task."""
        contents = self.buffer.contents()
        if len(contents.y) == 0:
            return np.zeros((0,)), np.zeros(0, dtype=np.int64)
        xs, ys = [], []
        for ordinal, name in enumerate(self.task_names):
            chosen = contents.x[contents.task_ids == ordinal]
            if len(chosen) == 0:
                continue
            x, y = past_data(name)
            xs.append(x[chosen])
            ys.append(y[chosen])
        return np.concatenate(xs), np.concatenate(ys)


@dataclass
class ContinualClientState:
    """What a continual client keeps between messages (see the module docstring)."""

    anchor: StateDict | None = None
    anchor_task: str = ""  # the task the anchor was installed for (the task it is the start of)
    fisher: FisherEstimate | None = None
    replay: ReplayIndex | None = None


def penalty_objective(penalty: QuadraticPenalty) -> Objective:
    """cross-entropy(logits, targets) + penalty(model)."""

    def objective(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets) + penalty(model)

    return objective


@dataclass(frozen=True)
class LocalProcedure:
    """What local training of one round uses: data, objective (None = plain cross-entropy), callbacks."""

    x: np.ndarray
    y: np.ndarray
    objective: Objective | None = None
    callbacks: Sequence[StepCallback] = ()
    sfa: SFACallback | None = None  # the client-side SFA callback, if any (also in `callbacks`)


@dataclass
class OffsetSFA:
    """SFA's after-step callback at a global step offset: step s of this round is step `offset + s` of the task."""

    inner: SFACallback
    offset: int

    def __call__(self, model: nn.Module, step: int) -> None:
        """Average with the anchor if step `offset + step` of the task is on the schedule."""
        self.inner(model, self.offset + step)


def local_procedure(settings: MethodSettings, state: ContinualClientState, task: str, x: np.ndarray,
                    y: np.ndarray, *, steps_per_round: int, round_in_task: int,
                    replay_data: tuple[np.ndarray, np.ndarray] | None = None) -> LocalProcedure:
    """The data, objective and callbacks of one round of local training on `task` (round `round_in_task`,
    1-based, of `settings.rounds_per_task`), for a client holding `state`. `replay_data` is the buffer's examples
    (replay only). An anchor installed for another task than `task` is not used (it is stale)."""
    if not 1 <= round_in_task <= settings.rounds_per_task:
        raise ValueError(f"round_in_task {round_in_task} is not in 1..{settings.rounds_per_task}")
    anchor = state.anchor if state.anchor is not None and state.anchor_task == task else None
    if settings.method == "replay" and replay_data is not None and len(replay_data[1]):
        x = np.concatenate([x, replay_data[0].astype(x.dtype)])
        y = np.concatenate([y, replay_data[1].astype(y.dtype)])
    if anchor is None or settings.method in ("finetune", "sfa", "replay", *MERGE_AFTER_TASK_METHODS):
        return LocalProcedure(x, y)
    if settings.method == "l2":
        return LocalProcedure(x, y, objective=penalty_objective(l2_penalty(anchor, settings.penalty)))
    if settings.method == "ewc":
        if state.fisher is None:
            raise ValueError("method ewc has an anchor but no Fisher: the server must install both")
        return LocalProcedure(x, y, objective=penalty_objective(ewc_penalty(anchor, state.fisher, settings.penalty)))
    schedule = SFASchedule(settings.rounds_per_task * steps_per_round, settings.sfa_p)
    callback = SFACallback(anchor, schedule, settings.sfa_beta)
    return LocalProcedure(x, y, callbacks=(OffsetSFA(callback, (round_in_task - 1) * steps_per_round),),
                          sfa=callback)
