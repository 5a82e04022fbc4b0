"""Named data views ("tasks") that a client trains on: a plain dataset, or one task of a continual stream.

A train message's config carries `task` (the standard experiment sends the dataset's name); the client finds its
data with `client_data(task, cfg, partition_id)`, the server its evaluation set with `load_task(task, cfg)`.

Names:
- a dataset of `fedsparse.config.DATASETS` (`fashion-mnist`, `digits`, ...): the whole dataset, `train-subset`
  applied; its client partitions are exactly `fedsparse.data.client_split` (the single-task runs of today).
- `<stream>:<part>` for a task of a continual stream (`STREAMS`; `stream_task_names(cfg)` lists them in order):
  `domains:mnist`, `domains:usps`, `domains:fashion-mnist`, `domains:cifar10` (all greyscale 1 x 28 x 28);
  `split-fmnist:0-1` ... `split-fmnist:8-9` (2 classes a task, labels kept on the 10-way head);
  `permuted-fmnist:0` ... `permuted-fmnist:4` (seeded pixel permutations, task 0 the identity);
  `split-digits:*` and `permuted-digits:*` are the same on scikit-learn's 16 x 16 digits (offline, tiny: tests).

Invariants:
- Every task of a stream has one input shape and labels in 0..9 for a shared 10-way head.
- A stream task keeps the first `cl.train-size` training and `cl.test-size` test examples of its own data (0 = all):
  a prefix, so a smaller cap gives a subset of a larger one. The stream's permutations come from `seed`.
- Client partitions are deterministic for (task, the partitioner keys, seed): the task's training labels go through
  the same flwr-datasets partitioners as a single-task run (`fedsparse.data.make_partitioner`), then each client
  holds out `val-fraction` of its examples for local validation, as `client_split` does.
- Everything is cached per process (a simulated client's actor keeps its tasks between rounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedsparse.continual.streams import Task, domain_stream, permuted_stream, split_stream
from fedsparse.data import client_split, load_dataset, partition_labels

NUM_CLASSES = 10  # the shared head of every stream
DOMAIN_ORDER = ("mnist", "usps", "fashion-mnist", "cifar10")
PERMUTED_TASKS = 5
STREAMS = ("domains", "split-fmnist", "permuted-fmnist", "split-digits", "permuted-digits")
STREAM_IMAGE_SIZE = {"domains": 28}


class UnknownTask(ValueError):
    """A task name that is neither a dataset nor a task of a known stream; `reason` says which part is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class StreamSettings:
    """What decides a stream's arrays: the data folder, the per-task caps (0 = all) and the permutation seed."""

    data_root: str
    train_size: int
    test_size: int
    seed: int

    @classmethod
    def of(cls, cfg: dict) -> StreamSettings:
        """The settings a resolved run config gives."""
        return cls(cfg["data-root"], cfg.get("cl.train-size", 0), cfg.get("cl.test-size", 0), cfg["seed"])


def _base_dataset(stream: str) -> str:
    return "digits" if stream.endswith("-digits") else "fashion-mnist"


@lru_cache(maxsize=8)
def _stream(stream: str, settings: StreamSettings) -> tuple[Task, ...]:
    train_size, test_size = settings.train_size or None, settings.test_size or None
    if stream == "domains":
        tasks = domain_stream(image_size=STREAM_IMAGE_SIZE["domains"], train_size=train_size, test_size=test_size,
                              datasets=DOMAIN_ORDER, data_root=settings.data_root)
        parts = DOMAIN_ORDER
    elif stream in ("split-fmnist", "split-digits"):
        tasks = split_stream(_base_dataset(stream), classes_per_task=2, train_size=train_size, test_size=test_size,
                             data_root=settings.data_root)
        parts = tuple("-".join(str(c) for c in task.classes) for task in tasks)
    elif stream in ("permuted-fmnist", "permuted-digits"):
        tasks = permuted_stream(_base_dataset(stream), num_tasks=PERMUTED_TASKS, seed=settings.seed,
                                train_size=train_size, test_size=test_size, data_root=settings.data_root)
        parts = tuple(str(index) for index in range(PERMUTED_TASKS))
    else:
        raise UnknownTask(f"unknown stream {stream!r}; known streams: {', '.join(STREAMS)}")
    return tuple(Task(f"{stream}:{part}", task.x_train, task.y_train, task.x_test, task.y_test, task.classes)
                 for part, task in zip(parts, tasks, strict=True))


def stream_tasks(stream: str, cfg: dict) -> list[Task]:
    """The tasks of `stream` in training order (the first `cl.num-tasks`, 0 = all), under the run config's caps
    and seed."""
    tasks = list(_stream(stream, StreamSettings.of(cfg)))
    count = cfg.get("cl.num-tasks", 0)
    if count > len(tasks):
        from fedsparse.config import ConfigError  # config reads this module's STREAMS

        raise ConfigError(f"config key 'cl.num-tasks': {count} is more than the {len(tasks)} tasks of stream {stream}")
    return tasks[:count] if count else tasks


def stream_task_names(stream: str, cfg: dict) -> list[str]:
    """The names of `stream`'s tasks in training order (`<stream>:<part>`)."""
    return [task.name for task in stream_tasks(stream, cfg)]


def is_dataset(name: str) -> bool:
    """Whether `name` is a plain dataset (not a stream task)."""
    return ":" not in name


@lru_cache(maxsize=4)
def _dataset_task(name: str, data_root: str, train_subset: int) -> Task:
    data = load_dataset(name, data_root)
    x_train, y_train = data.x_train[:train_subset or None], data.y_train[:train_subset or None]
    classes = tuple(int(c) for c in np.unique(np.concatenate([y_train, data.y_test])))
    return Task(name, x_train, y_train, data.x_test, data.y_test, classes)


def load_task(name: str, cfg: dict) -> Task:
    """The task called `name` (see the module docstring) under the resolved run config `cfg`."""
    if is_dataset(name):
        try:
            return _dataset_task(name, cfg["data-root"], cfg["train-subset"])
        except ValueError as err:
            raise UnknownTask(f"unknown task {name!r}: {err}") from err
    stream, _, part = name.partition(":")
    for task in stream_tasks(stream, cfg):
        if task.name == name:
            return task
    known = ", ".join(task.name for task in stream_tasks(stream, cfg))
    raise UnknownTask(f"stream {stream!r} has no task {part!r}; its tasks: {known}")


def task_input_shape(name: str, cfg: dict) -> tuple[int, ...]:
    """(C, H, W) of a task's images."""
    return load_task(name, cfg).input_shape


def _partition(labels: np.ndarray, kind: str, num_clients: int, seed: int, alpha: float, classes_per_client: int,
               shards_per_client: int) -> tuple[np.ndarray, ...]:
    """Training indices of every client for one task's labels, cached on disk by
    `fedsparse.data.partition_labels` (a fresh ClientApp process per message does not redraw it)."""
    return partition_labels(labels, "task", kind, num_clients, seed, alpha, classes_per_client, shards_per_client)


@lru_cache(maxsize=32)
def _task_partitions(name: str, settings: StreamSettings, kind: str, num_clients: int, seed: int, alpha: float,
                     classes_per_client: int, shards_per_client: int) -> tuple[np.ndarray, ...]:
    stream = name.partition(":")[0]
    labels = next(task.y_train for task in _stream(stream, settings) if task.name == name)
    return _partition(labels, kind, num_clients, seed, alpha, classes_per_client, shards_per_client)


def task_split(name: str, cfg: dict, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) into `load_task(name, cfg)`'s training set held by client
    `partition_id`; for a plain dataset exactly `fedsparse.data.client_split`."""
    if not 0 <= partition_id < cfg["num-clients"]:
        raise ValueError(f"partition_id {partition_id} is not in 0..{cfg['num-clients'] - 1}")
    if is_dataset(name):
        if name != cfg["dataset"]:
            raise UnknownTask(f"task {name!r} is a dataset other than the run's dataset {cfg['dataset']!r}")
        return client_split(cfg, partition_id)
    parts = _task_partitions(name, StreamSettings.of(cfg), cfg["partitioner"], cfg["num-clients"], cfg["seed"],
                             cfg["dirichlet-alpha"], cfg["classes-per-client"], cfg["shards-per-client"])
    rng = np.random.default_rng([cfg["seed"], partition_id])
    shuffled = rng.permutation(parts[partition_id])
    held_out = round(len(shuffled) * cfg["val-fraction"]) if len(shuffled) > 1 else 0
    return np.sort(shuffled[held_out:]), np.sort(shuffled[:held_out])


def client_data(name: str, cfg: dict, partition_id: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of client `partition_id` on task `name`: its training part (`split="train"`) or its local
    validation part (`split="val"`)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    task = load_task(name, cfg)
    train_idx, val_idx = task_split(name, cfg, partition_id)
    idx = train_idx if split == "train" else val_idx
    return task.x_train[idx], task.y_train[idx]
