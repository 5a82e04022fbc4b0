"""SFA (Kleiman et al. 2025, "Soup to go"): average the model being trained with the previous task's final model.

Rule (merging.md section A.1): after every `interval = max(1, round(p * T))` steps of a task of T steps, and once at
its last step, theta <- (1 - beta) * theta + beta * theta_o, where theta_o (the *anchor*) is the model at the end of
the previous task, i.e. the model the current task started from, already averaged. p = 1 averages only at task
ends (a WiSE-FT-like interpolation); p < 1 also averages during the task.

Invariants:
- `sfa_average` is pure: it returns new tensors and never modifies its inputs. Only floating-point entries are
  averaged; every other entry (integer buffers, boolean masks) is copied from the current model.
- `average_model_` writes into the model's existing tensors, so an optimiser that holds the parameters keeps its
  state (momentum is not reset by averaging).
- The anchor is fixed during a task: it is set once, at the task's start, from the model as it is then.
- A "step" is whatever the caller counts: optimiser steps for the centralised/client-side variant (`SFACallback`),
  federated rounds for the server-side variant (`ServerSFA`). Steps are numbered from 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


class StateMismatch(ValueError):
    """Two state dicts cannot be averaged; `reason` names the key and what differs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def _check_same_layout(current: StateDict, anchor: StateDict) -> None:
    if set(current) != set(anchor):
        missing, extra = sorted(set(current) - set(anchor)), sorted(set(anchor) - set(current))
        raise StateMismatch(f"anchor keys differ: missing {missing[:5]}, extra {extra[:5]}")
    for key, value in current.items():
        if anchor[key].shape != value.shape:
            raise StateMismatch(f"'{key}': anchor shape {tuple(anchor[key].shape)} != {tuple(value.shape)}")


def sfa_average(current: StateDict, anchor: StateDict, beta: float) -> StateDict:
    """(1 - beta) * current + beta * anchor for every floating-point entry; other entries copied from `current`."""
    _check_beta(beta)
    _check_same_layout(current, anchor)
    averaged = {}
    for key, value in current.items():
        if torch.is_floating_point(value):
            averaged[key] = (1.0 - beta) * value + beta * anchor[key].to(device=value.device, dtype=value.dtype)
        else:
            averaged[key] = value.clone()
    return averaged


@torch.no_grad()
def average_model_(model: nn.Module, anchor: StateDict, beta: float) -> None:
    """In place: every floating-point state entry of `model` becomes (1 - beta) * entry + beta * anchor."""
    _check_beta(beta)
    state = model.state_dict()  # references to the live tensors
    _check_same_layout(state, anchor)
    for key, value in state.items():
        if torch.is_floating_point(value):
            value.mul_(1.0 - beta).add_(anchor[key].to(device=value.device, dtype=value.dtype), alpha=beta)


def snapshot(model: nn.Module) -> StateDict:
    """A detached copy of the model's state, to serve as an anchor."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@dataclass(frozen=True)
class SFASchedule:
    """When to average within a task of `total_steps` steps: every `interval` steps and at the last one."""

    total_steps: int
    p: float

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {self.p}")

    @property
    def interval(self) -> int:
        """max(1, round(p * T)) steps between averagings."""
        return max(1, round(self.p * self.total_steps))

    def should_average(self, step: int) -> bool:
        """Whether to average after `step` (1-based) of the task."""
        if not 1 <= step <= self.total_steps:
            raise ValueError(f"step must be in 1..{self.total_steps}, got {step}")
        return step % self.interval == 0 or step == self.total_steps

    def averaging_steps(self) -> list[int]:
        """All steps after which the schedule averages."""
        return [step for step in range(1, self.total_steps + 1) if self.should_average(step)]


@dataclass(frozen=True)
class SFAConfig:
    """SFA's two knobs: `beta` (weight of the anchor) and `p` (fraction of the task between averagings).

    `average_first_task`: whether the first task is averaged too, with the initial model as anchor (the paper
    starts from a pretrained model; from a random initialisation this only slows the first task, so off)."""

    beta: float = 0.5
    p: float = 0.25
    average_first_task: bool = False

    def __post_init__(self) -> None:
        _check_beta(self.beta)
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {self.p}")


@dataclass
class SFACallback:
    """Client-side / centralised SFA as an after-step hook: call it after every optimiser step with the model and
    the 1-based step number; it averages the model in place with `anchor` when the schedule says so.

    `anchor` is the previous task's final model (a federated client receives it from the server once per task).
    `averaged_at` records the steps at which it averaged."""

    anchor: StateDict
    schedule: SFASchedule
    beta: float
    averaged_at: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_beta(self.beta)

    def __call__(self, model: nn.Module, step: int) -> None:
        """Average `model` with the anchor if `step` is on the schedule."""
        if self.schedule.should_average(step):
            average_model_(model, self.anchor, self.beta)
            self.averaged_at.append(step)


@dataclass
class ServerSFA:
    """Server-side SFA over federated rounds: the global model is averaged with the anchor after the rounds the
    schedule picks (p as a fraction of the task's rounds), and at the task's last round.

    Use: `start_task(global_state, rounds)` at a task's first round (the anchor becomes a copy of the global model
    as it is then, i.e. the previous task's final, already averaged, model); after aggregating round r (1-based
    within the task), `global_state = sfa.after_round(r, global_state)`."""

    config: SFAConfig
    anchor: StateDict | None = None
    schedule: SFASchedule | None = None
    averaged_rounds: list[tuple[int, int]] = field(default_factory=list)  # (task index, round in task)
    task_index: int = -1

    def start_task(self, global_state: StateDict, rounds: int) -> None:
        """Begin a task of `rounds` rounds from `global_state`, which becomes the anchor."""
        self.anchor = {key: value.detach().clone() for key, value in global_state.items()}
        self.schedule = SFASchedule(rounds, self.config.p)
        self.task_index += 1

    def after_round(self, round_in_task: int, global_state: StateDict) -> StateDict:
        """The global state to carry on with after `round_in_task`: averaged with the anchor if scheduled."""
        if self.anchor is None or self.schedule is None:
            raise RuntimeError("ServerSFA.after_round before start_task: there is no anchor yet")
        if not self.schedule.should_average(round_in_task):
            return global_state
        if self.task_index == 0 and not self.config.average_first_task:
            return global_state
        self.averaged_rounds.append((self.task_index, round_in_task))
        return sfa_average(global_state, self.anchor, self.config.beta)

    def state_dict(self) -> dict[str, object]:
        """What the server must keep across a restart: the anchor, the task's round count and position."""
        return {"anchor": None if self.anchor is None else {k: v.clone() for k, v in self.anchor.items()},
                "rounds": None if self.schedule is None else self.schedule.total_steps,
                "task_index": self.task_index, "averaged_rounds": list(self.averaged_rounds)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what `state_dict` saved (the config is not part of it: build the object with the same one)."""
        anchor = state["anchor"]
        self.anchor = None if anchor is None else {k: v.clone() for k, v in anchor.items()}
        self.schedule = None if state["rounds"] is None else SFASchedule(int(state["rounds"]), self.config.p)
        self.task_index = int(state["task_index"])
        self.averaged_rounds = [tuple(pair) for pair in state["averaged_rounds"]]
