"""A bounded, seeded buffer of past-task examples for experience replay (one per client in federated runs).

Invariants:
- The buffer never holds more than `capacity` examples.
- It holds only *past* tasks: examples enter through `add_task`, which the caller invokes once a task is over
  (the driver does it after the task's training). Adding a task id that is already in the buffer is an error, so a
  task cannot be fed twice or while it is still being trained on.
- Selection is random but reproducible: all draws come from one numpy Generator seeded at construction, whose
  state is part of `state_dict()`.

Strategies:
- `reservoir`: reservoir sampling over the stream of all examples added so far (each seen example is in the
  buffer with probability capacity / seen).
- `class_balanced`: after each task, an equal share of the capacity per class seen so far (the remainder going to
  the lowest labels), each class's share drawn uniformly from that class's examples in the buffer plus the new task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

REPLAY_STRATEGIES = ("reservoir", "class_balanced")


@dataclass(frozen=True)
class ReplaySample:
    """Examples drawn from the buffer, with the task each came from."""

    x: np.ndarray
    y: np.ndarray
    task_ids: np.ndarray


class ReplayBuffer:
    """Bounded memory of past-task examples (see the module docstring for the invariants)."""

    def __init__(self, capacity: int, *, strategy: str = "reservoir", seed: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if strategy not in REPLAY_STRATEGIES:
            raise ValueError(f"strategy must be one of {REPLAY_STRATEGIES}, got {strategy!r}")
        self.capacity = capacity
        self.strategy = strategy
        self.rng = np.random.default_rng(seed)
        self.x: np.ndarray | None = None
        self.y = np.zeros(0, dtype=np.int64)
        self.task_ids = np.zeros(0, dtype=np.int64)
        self.seen = 0  # examples offered so far (reservoir sampling's n)
        self._added_tasks: set[int] = set()

    def __len__(self) -> int:
        return len(self.y)

    @property
    def tasks(self) -> set[int]:
        """The ids of the tasks that have been added."""
        return set(self._added_tasks)

    def add_task(self, task_id: int, x: np.ndarray, y: np.ndarray) -> None:
        """Offer every example of a finished task `task_id` to the buffer."""
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
        if task_id in self._added_tasks:
            raise ValueError(f"task {task_id} was already added to the replay buffer")
        self._added_tasks.add(task_id)
        if len(x) == 0:
            return
        if self.x is None:
            self.x = np.zeros((0, *x.shape[1:]), dtype=x.dtype)
        if self.strategy == "reservoir":
            self._reservoir(task_id, x, y)
        else:
            self._class_balanced(task_id, x, y)

    def _reservoir(self, task_id: int, x: np.ndarray, y: np.ndarray) -> None:
        free = min(self.capacity - len(self), len(x))
        keep_x, keep_y, keep_t = [self.x, x[:free]], [self.y, y[:free]], [self.task_ids, np.full(free, task_id)]
        self.x, self.y, self.task_ids = (np.concatenate(keep_x), np.concatenate(keep_y).astype(np.int64),
                                         np.concatenate(keep_t).astype(np.int64))
        self.seen += free
        for index in range(free, len(x)):
            self.seen += 1
            slot = int(self.rng.integers(0, self.seen))  # uniform in 0..seen-1
            if slot < self.capacity:
                self.x[slot], self.y[slot], self.task_ids[slot] = x[index], y[index], task_id

    def _class_balanced(self, task_id: int, x: np.ndarray, y: np.ndarray) -> None:
        pool_x = np.concatenate([self.x, x])
        pool_y = np.concatenate([self.y, y]).astype(np.int64)
        pool_t = np.concatenate([self.task_ids, np.full(len(x), task_id)]).astype(np.int64)
        self.seen += len(x)
        classes = np.unique(pool_y)
        quota = np.full(len(classes), self.capacity // len(classes))
        quota[: self.capacity % len(classes)] += 1
        chosen = []
        for label, share in zip(classes, quota, strict=True):
            members = np.flatnonzero(pool_y == label)
            chosen.append(self.rng.permutation(members)[:share])
        keep = np.sort(np.concatenate(chosen))
        self.x, self.y, self.task_ids = pool_x[keep], pool_y[keep], pool_t[keep]

    def sample(self, count: int) -> ReplaySample:
        """`count` examples drawn uniformly without replacement (all of them if the buffer holds fewer)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if self.x is None or len(self) == 0:
            raise ValueError("the replay buffer is empty")
        pick = self.rng.permutation(len(self))[:count]
        return ReplaySample(self.x[pick], self.y[pick], self.task_ids[pick])

    def contents(self) -> ReplaySample:
        """Everything in the buffer (copies)."""
        if self.x is None:
            return ReplaySample(np.zeros((0,), dtype=np.float32), self.y.copy(), self.task_ids.copy())
        return ReplaySample(self.x.copy(), self.y.copy(), self.task_ids.copy())

    def state_dict(self) -> dict[str, Any]:
        """What a client must keep across a restart to continue exactly: contents, counters and the RNG state."""
        return {"capacity": self.capacity, "strategy": self.strategy, "x": self.x, "y": self.y.copy(),
                "task_ids": self.task_ids.copy(), "seen": self.seen, "tasks": sorted(self.tasks),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a buffer saved by `state_dict`."""
        if state["capacity"] != self.capacity or state["strategy"] != self.strategy:
            raise ValueError(f"saved buffer ({state['capacity']}, {state['strategy']}) does not match this one "
                             f"({self.capacity}, {self.strategy})")
        self.x = None if state["x"] is None else state["x"].copy()
        self.y, self.task_ids = state["y"].copy(), state["task_ids"].copy()
        self.seen = int(state["seen"])
        self._added_tasks = set(state["tasks"])
        self.rng.bit_generator.state = state["rng"]


def with_replay(x: np.ndarray, y: np.ndarray, buffer: ReplayBuffer) -> tuple[np.ndarray, np.ndarray]:
    """The current task's training data with the whole buffer appended (the current data alone if it is empty)."""
    if len(buffer) == 0:
        return x, y
    stored = buffer.contents()
    return np.concatenate([x, stored.x.astype(x.dtype)]), np.concatenate([y, stored.y.astype(y.dtype)])
