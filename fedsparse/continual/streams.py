"""Task streams for continual learning: ordered lists of `Task`, built from `fedsparse.data.load_dataset`.

Invariants:
- Every task of a stream has images of one common shape (C, H, W), float32 in [0, 1], and int64 labels in
  0..9 for a shared 10-way head (class-incremental: split tasks keep their global labels, nothing is remapped).
- `Task.classes` lists the labels that occur in the task, sorted.
- Builders are deterministic: the same arguments give the same arrays. Training subsets are prefixes (the training
  sets come from `load_dataset` in an order without class structure); test subsets are a fixed seeded draw, kept
  in order (`test_subset`: the CIFAR-10 JPEG test set is sorted by class, so its prefix is one class); pixel
  permutations come from a seeded generator.

Streams:
- `domain_stream`: MNIST -> USPS -> Fashion-MNIST -> CIFAR-10, all greyscale (ITU-R 601 luma for CIFAR-10) and
  resized (bilinear, antialiased) to one `image_size`.
- `split_stream`: one dataset cut into tasks of `classes_per_task` consecutive classes ((0,1), (2,3), ...).
- `permuted_stream`: one dataset under `num_tasks` seeded pixel permutations; task 0 is the identity by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedsparse.data import Dataset, load_dataset

DOMAIN_DATASETS = ("mnist", "usps", "fashion-mnist", "cifar10")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, the usual RGB -> grey conversion
TEST_SUBSET_SEED = 20251  # the fixed draw of a task's test subset


@dataclass(frozen=True)
class Task:
    """One task of a stream: its own train and test data and the labels it contains."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[int, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the task's images."""
        return tuple(self.x_train.shape[1:])


def _check_subset(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be a positive number of examples or None, got {value}")


def test_subset(num_examples: int, test_size: int | None) -> np.ndarray:
    """Indices of the `test_size` test examples a task keeps: all of them, or a fixed random subset in their
    original order (a prefix would not do: the CIFAR-10 JPEG test set is sorted by class)."""
    if test_size is None or test_size >= num_examples:
        return np.arange(num_examples)
    return np.sort(np.random.default_rng(TEST_SUBSET_SEED).permutation(num_examples)[:test_size])


def _make_task(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
               train_size: int | None, test_size: int | None) -> Task:
    """A task from its arrays: the first `train_size` training examples, `test_subset` of the test examples
    (`x_test` may already be that subset: then pass test_size=None)."""
    x_train, y_train = x_train[:train_size], y_train[:train_size]
    keep = test_subset(len(y_test), test_size)
    x_test, y_test = x_test[keep], y_test[keep]
    classes = tuple(int(c) for c in np.unique(np.concatenate([y_train, y_test])))
    return Task(name, np.ascontiguousarray(x_train, dtype=np.float32), y_train.astype(np.int64),
                np.ascontiguousarray(x_test, dtype=np.float32), y_test.astype(np.int64), classes)


def to_grey_resized(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, C, H, W) float images -> (N, 1, image_size, image_size): luma for 3 channels, bilinear resize."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) images, got shape {images.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if tensor.shape[1] == 3:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
        tensor = (tensor * weights).sum(dim=1, keepdim=True)
    if tuple(tensor.shape[2:]) != (image_size, image_size):
        tensor = torch.nn.functional.interpolate(tensor, size=(image_size, image_size), mode="bilinear",
                                                 align_corners=False, antialias=True).clamp_(0.0, 1.0)
    return tensor.numpy()


def domain_stream(*, image_size: int = 28, train_size: int | None = None, test_size: int | None = None,
                  datasets: Sequence[str] = DOMAIN_DATASETS, data_root: str = "") -> list[Task]:
    """Diverse domains, one task per dataset in `datasets` (default MNIST, USPS, Fashion-MNIST, CIFAR-10), each
    greyscale at 1 x image_size x image_size with its 10 classes on the shared head. `train_size`/`test_size` keep
    a prefix of each split. MNIST offline is `load_dataset`'s test-set fallback (8000/2000)."""
    _check_subset("train_size", train_size)
    _check_subset("test_size", test_size)
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    tasks = []
    for name in datasets:
        data: Dataset = load_dataset(name, data_root)
        tasks.append(_make_task(
            name,
            to_grey_resized(data.x_train[:train_size], image_size), data.y_train,
            to_grey_resized(data.x_test[test_subset(len(data.y_test), test_size)], image_size),
            data.y_test[test_subset(len(data.y_test), test_size)], train_size, None))
    return tasks


def split_stream(dataset: str = "fashion-mnist", *, classes_per_task: int = 2, train_size: int | None = None,
                 test_size: int | None = None, data_root: str = "") -> list[Task]:
    """`dataset` cut into tasks of `classes_per_task` consecutive labels (fashion-mnist: 5 tasks of 2 classes).
    `train_size`/`test_size` cap each task's examples (a prefix of that task's examples)."""
    _check_subset("train_size", train_size)
    _check_subset("test_size", test_size)
    data = load_dataset(dataset, data_root)
    if classes_per_task <= 0 or data.num_classes % classes_per_task:
        raise ValueError(f"classes_per_task={classes_per_task} must divide the {data.num_classes} classes")
    tasks = []
    for first in range(0, data.num_classes, classes_per_task):
        labels = np.arange(first, first + classes_per_task)
        train = np.isin(data.y_train, labels)
        test = np.isin(data.y_test, labels)
        tasks.append(_make_task(f"{dataset}:{'-'.join(str(c) for c in labels)}",
                                data.x_train[train], data.y_train[train], data.x_test[test], data.y_test[test],
                                train_size, test_size))
    return tasks


def pixel_permutations(num_tasks: int, num_pixels: int, seed: int, *, first_identity: bool = True
                       ) -> list[np.ndarray]:
    """`num_tasks` permutations of `num_pixels` indices from one seeded generator (task 0 the identity if asked)."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(num_pixels) for _ in range(num_tasks)]
    if first_identity and perms:
        perms[0] = np.arange(num_pixels)
    return perms


def permuted_stream(dataset: str = "fashion-mnist", *, num_tasks: int = 5, seed: int = 0,
                    first_identity: bool = True, train_size: int | None = None, test_size: int | None = None,
                    data_root: str = "") -> list[Task]:
    """`dataset` under `num_tasks` seeded pixel permutations (the same permutation for every channel); all
    classes in every task."""
    _check_subset("train_size", train_size)
    _check_subset("test_size", test_size)
    if num_tasks <= 0:
        raise ValueError(f"num_tasks must be positive, got {num_tasks}")
    data = load_dataset(dataset, data_root)
    keep = test_subset(len(data.y_test), test_size)
    x_train, x_test = data.x_train[:train_size], data.x_test[keep]
    channels, height, width = x_train.shape[1:]
    perms = pixel_permutations(num_tasks, height * width, seed, first_identity=first_identity)

    def permute(images: np.ndarray, perm: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), channels, height * width)
        return flat[:, :, perm].reshape(images.shape)

    return [_make_task(f"{dataset}:perm{index}", permute(x_train, perm), data.y_train[:train_size],
                       permute(x_test, perm), data.y_test[keep], None, None)
            for index, perm in enumerate(perms)]


def partition_task(task: Task, num_clients: int, *, kind: str = "dirichlet", seed: int = 0, alpha: float = 0.3,
                   classes_per_client: int = 2, shards_per_client: int = 2) -> list[np.ndarray]:
    """Split one task's training set over `num_clients` with `fedsparse.data.make_partitioner` (the same
    flwr-datasets partitioners as the single-task runs): a sorted array of training indices per client. The
    partitions are disjoint; iid ones cover every example (flwr-datasets may leave a few examples out otherwise)."""
    if num_clients <= 0:
        raise ValueError(f"num_clients must be positive, got {num_clients}")
    from datasets import Dataset as HFDataset
    from datasets.utils.logging import disable_progress_bar

    from fedsparse.data import make_partitioner

    disable_progress_bar()
    partitioner = make_partitioner(kind, num_clients, seed, alpha, classes_per_client, shards_per_client)
    partitioner.dataset = HFDataset.from_dict({"idx": np.arange(len(task.y_train)), "label": task.y_train})
    return [np.sort(np.asarray(partitioner.load_partition(client)["idx"], dtype=np.int64))
            for client in range(num_clients)]
