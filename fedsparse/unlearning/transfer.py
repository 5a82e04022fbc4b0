"""Transfer unlearning by data selection (Sepahvand et al., arXiv:2405.10425), as library functions without Flower.

A model pretrained on a source dataset is transferred (finetuned, with a fresh classifier head) to a target
dataset split into a *static* part, usable forever, and a *non-static* part, whose owners may later withdraw it.
Three ways to finetune (`TRANSFER_METHODS`):

- `data_selection`: for every non-static example, its k nearest neighbours in an auxiliary static pool, measured in
  the PRETRAINED model's feature space (scikit-learn `NearestNeighbors`), are selected; the model is finetuned on
  static + selected. The non-static data only *chooses* training data, it is never trained on, so a withdrawal
  needs no unlearning at all (exact under the paper's relaxed definition, which is about training use, not privacy).
- `static_only`: finetune on the static part only (exact unlearning, the lower baseline).
- `all_data`: finetune on the whole target set (upper bound; cannot honour a withdrawal without retraining).

Invariants:
- Example ids: target example i has id i; auxiliary pool example j has id `len(target) + j` (`TransferTask`).
- The one finetuning loop (`finetune_on`) takes an `IndexedData` (x, y and id per example, indexed together) and
  records the id of every example in every minibatch it backpropagates through. `TransferResult.trained_ids` is
  that record, so "no non-static example ever reached a gradient" is a checkable set property.
- Selection runs on features of the pretrained model given, before any finetuning, and never modifies it.
- Neighbour ties are resolved deterministically: equal distances go to the lower pool index (`select_neighbours`).
- Features (`penultimate_features`) are the input of the model's last `nn.Linear` (the classifier head), captured
  with a forward pre-hook: the penultimate layer of every model in `fedsparse.models` (cnn, mlp, resnet18).
- Deterministic for a seed on CPU: head initialisation, static/non-static split and data order are seeded.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors
from torch import nn

from fedsparse.unlearning.core import ArrayData

FeatureFn = Callable[[nn.Module, ArrayData], np.ndarray]
LabelSource = Literal["query", "auxiliary"]
TRANSFER_METHODS: tuple[str, ...] = ("data_selection", "static_only", "all_data")
HEAD_SEED_OFFSET = 0x7EAD


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True, eq=False)
class IndexedData:
    """Labelled examples that each carry an integer id; `x`, `y` and `ids` are indexed together."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.x) == len(self.y) == len(self.ids):
            raise ValueError(f"x, y and ids differ in length: {len(self.x)}, {len(self.y)}, {len(self.ids)}")

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def concatenate(parts: Sequence[IndexedData]) -> IndexedData:
        """The examples of all `parts`, in order."""
        return IndexedData(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                           np.concatenate([p.ids for p in parts]))


@dataclass(frozen=True, eq=False)
class TransferTask:
    """A target dataset split into static and non-static examples, an auxiliary static pool, and a test set.

    `static` is a boolean mask over `target` (True = static, usable forever). Labels of `target` and `test` are
    target classes 0..C-1; the auxiliary pool's labels are used only with `label_source="auxiliary"`.
    """

    target: ArrayData
    static: np.ndarray
    auxiliary: ArrayData
    test: ArrayData

    def __post_init__(self) -> None:
        if self.static.dtype != np.bool_ or self.static.shape != (len(self.target),):
            raise ValueError(f"static must be a boolean mask of shape ({len(self.target)},), "
                             f"got {self.static.dtype} {self.static.shape}")
        if len(self.auxiliary) == 0:
            raise ValueError("the auxiliary pool is empty")

    @property
    def static_ids(self) -> np.ndarray:
        """Ids of the static target examples."""
        return np.flatnonzero(self.static)

    @property
    def non_static_ids(self) -> np.ndarray:
        """Ids of the non-static target examples (the ones that may be withdrawn)."""
        return np.flatnonzero(~self.static)

    @property
    def auxiliary_ids(self) -> np.ndarray:
        """Ids of the auxiliary pool's examples: `len(target) + j` for pool index j."""
        return len(self.target) + np.arange(len(self.auxiliary))

    @property
    def num_classes(self) -> int:
        """Number of target classes: one more than the largest label in the target and test sets."""
        return int(max(self.target.y.max(), self.test.y.max())) + 1

    def target_part(self, ids: np.ndarray) -> IndexedData:
        """The target examples with these ids."""
        return IndexedData(self.target.x[ids], self.target.y[ids], np.asarray(ids, dtype=np.int64))


def split_static(num_examples: int, static_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask with round(static_fraction * num_examples) True entries at seeded random positions."""
    if not 0 <= static_fraction <= 1:
        raise ValueError(f"static_fraction must be in [0, 1], got {static_fraction}")
    mask = np.zeros(num_examples, dtype=bool)
    order = np.random.default_rng(seed).permutation(num_examples)
    mask[order[:round(static_fraction * num_examples)]] = True
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Features and neighbour selection


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the model's classifier head: its last `nn.Linear` in module order."""
    found: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError("the model has no nn.Linear layer to serve as the classifier head")
    return found


@torch.no_grad()
def penultimate_features(model: nn.Module, data: ArrayData, *, batch_size: int = 1000) -> np.ndarray:
    """The input of the model's classifier head for every example of `data`, float64 [examples, features].

    The model runs in eval mode on its own device; its training mode is restored afterwards."""
    _, head = classifier_head(model)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            model(torch.from_numpy(data.x[start:start + batch_size]).to(device))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured).flatten(1).double().cpu().numpy()


@dataclass(frozen=True, eq=False)
class NeighbourSelection:
    """For query q, `pool_index[q]` are the pool indices of its k nearest neighbours, nearest first, and
    `distances[q]` their Euclidean distances."""

    pool_index: np.ndarray
    distances: np.ndarray


def select_neighbours(query_features: np.ndarray, pool_features: np.ndarray, k: int) -> NeighbourSelection:
    """The k nearest pool points of every query point (Euclidean), ties resolved to the lower pool index.

    scikit-learn's `NearestNeighbors` finds the k-th distance and every pool point within it (with a small slack for
    rounding); the candidates are then ranked by their exactly recomputed distance, then by pool index."""
    if not 1 <= k <= len(pool_features):
        raise ValueError(f"k must be in [1, {len(pool_features)}] (the pool size), got {k}")
    if query_features.ndim != 2 or pool_features.ndim != 2 or query_features.shape[1] != pool_features.shape[1]:
        raise ValueError(f"features must be 2-D with equal widths, got {query_features.shape} and "
                         f"{pool_features.shape}")
    pool = np.asarray(pool_features, dtype=np.float64)
    queries = np.asarray(query_features, dtype=np.float64)
    index = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(pool)
    kth_distance = index.kneighbors(queries, n_neighbors=k)[0][:, -1]
    pool_index = np.empty((len(queries), k), dtype=np.int64)
    distances = np.empty((len(queries), k))
    for q, (query, radius) in enumerate(zip(queries, kth_distance, strict=True)):
        slack = 1e-9 * max(1.0, radius) + 1e-12
        candidates = index.radius_neighbors(query[None], radius=radius + slack, return_distance=False)[0]
        exact = np.sqrt(((pool[candidates] - query) ** 2).sum(axis=1))
        order = np.lexsort((candidates, exact))[:k]
        pool_index[q] = candidates[order]
        distances[q] = exact[order]
    return NeighbourSelection(pool_index, distances)


# ----------------------------------------------------------------------------------------------------------------
# Finetuning


@dataclass(frozen=True)
class TransferConfig:
    """Settings of transfer finetuning and data selection.

    epochs, batch_size, lr, momentum, weight_decay: SGD finetuning of the whole model (fresh head included).
    steps: if set, train for exactly this many minibatch steps (reshuffled passes, the last one cut short)
        instead of `epochs` passes: the same optimisation budget whatever the training set's size.
    neighbours: k, the auxiliary examples selected per non-static example.
    label_source: label of a selected auxiliary example: "query" = the label of the non-static example that
        selected it (the auxiliary pool may be unlabelled in the target classes), "auxiliary" = its own label.
    seed: seeds the fresh head and the data order.
    device: torch device name.
    """

    epochs: int = 5
    steps: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    neighbours: int = 1
    label_source: LabelSource = "query"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "neighbours"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or None, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.label_source not in ("query", "auxiliary"):
            raise ValueError(f"label_source must be 'query' or 'auxiliary', got {self.label_source!r}")


@dataclass(frozen=True, eq=False)
class FinetuneRun:
    """A finetuned model and the sorted unique ids of every example it backpropagated through."""

    model: nn.Module
    trained_ids: np.ndarray


def with_fresh_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of `model` whose classifier head is a new `nn.Linear(in_features, num_classes)`, seeded."""
    work = copy.deepcopy(model)
    name, head = classifier_head(work)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + HEAD_SEED_OFFSET)
        fresh = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    fresh.to(head.weight.device)
    if not name:
        return fresh
    parent_name, _, attribute = name.rpartition(".")
    setattr(work.get_submodule(parent_name) if parent_name else work, attribute, fresh)
    return work


def finetune_on(model: nn.Module, data: IndexedData, cfg: TransferConfig) -> FinetuneRun:
    """SGD on a copy of `model` over `data` (cross-entropy, shuffled minibatches, `cfg.epochs` passes or exactly
    `cfg.steps` minibatches).

    The ids of every minibatch are recorded right where its loss is backpropagated: `trained_ids` is exactly the
    set of examples that reached a gradient."""
    if len(data) == 0:
        raise ValueError("nothing to finetune on: the training set is empty")
    device = torch.device(cfg.device)
    work = copy.deepcopy(model).to(device)
    work.train()
    optimizer = torch.optim.SGD(work.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    seen = np.zeros(0, dtype=np.int64)
    for batch in minibatch_indices(len(data), cfg, generator):
        x = torch.from_numpy(data.x[batch]).to(device)
        y = torch.from_numpy(data.y[batch]).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(work(x), y)
        seen = np.union1d(seen, data.ids[batch])
        loss.backward()
        optimizer.step()
    return FinetuneRun(work, seen)


def minibatch_indices(num_examples: int, cfg: TransferConfig, generator: torch.Generator) -> Iterator[np.ndarray]:
    """Index arrays of the minibatches: reshuffled passes over the data, `cfg.epochs` of them, or as many as
    `cfg.steps` minibatches take."""
    steps = 0
    passes = 0
    while (passes < cfg.epochs) if cfg.steps is None else (steps < cfg.steps):
        order = torch.randperm(num_examples, generator=generator).numpy()
        for start in range(0, num_examples, cfg.batch_size):
            if cfg.steps is not None and steps == cfg.steps:
                return
            steps += 1
            yield order[start:start + cfg.batch_size]
        passes += 1


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """What a transfer method finetunes on, and, for data selection, the auxiliary pool indices it selected."""

    data: IndexedData
    selected_pool_index: np.ndarray | None


def training_set(method: str, pretrained: nn.Module, task: TransferTask, cfg: TransferConfig, *,
                 feature_fn: FeatureFn = penultimate_features) -> TrainingSet:
    """The training set of `method` (one of `TRANSFER_METHODS`).

    For `data_selection`, `feature_fn(pretrained, ...)` embeds the non-static examples (queries) and the auxiliary
    pool; every (query, neighbour) pair adds the neighbour once, labelled per `cfg.label_source` (an auxiliary
    example picked by several queries appears several times)."""
    if method not in TRANSFER_METHODS:
        raise ValueError(f"unknown transfer method '{method}'; known: {', '.join(TRANSFER_METHODS)}")
    static = task.target_part(task.static_ids)
    if method == "static_only":
        return TrainingSet(static, None)
    if method == "all_data":
        return TrainingSet(task.target_part(np.arange(len(task.target))), None)
    non_static_ids = task.non_static_ids
    if len(non_static_ids) == 0:
        return TrainingSet(static, np.zeros(0, dtype=np.int64))
    queries = task.target.subset(non_static_ids)
    selection = select_neighbours(feature_fn(pretrained, queries), feature_fn(pretrained, task.auxiliary),
                                  cfg.neighbours)
    picked = selection.pool_index.reshape(-1)
    labels = (np.repeat(queries.y, cfg.neighbours) if cfg.label_source == "query" else task.auxiliary.y[picked])
    selected = IndexedData(task.auxiliary.x[picked], labels.astype(np.int64), task.auxiliary_ids[picked])
    return TrainingSet(IndexedData.concatenate([static, selected]), picked)


@dataclass(frozen=True, eq=False)
class TransferResult:
    """A transferred model, the ids it trained on (sorted, unique), the size of its training set (duplicates
    counted), the selected pool indices (data selection only), and its accuracy on the task's test set."""

    method: str
    model: nn.Module
    trained_ids: np.ndarray
    train_examples: int
    selected_pool_index: np.ndarray | None
    test_accuracy: float


@torch.no_grad()
def accuracy_on(model: nn.Module, data: ArrayData, *, batch_size: int = 1000) -> float:
    """Share of `data` the model classifies correctly (eval mode, the model's own device)."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = model(torch.from_numpy(data.x[start:start + batch_size]).to(device))
        correct += int((logits.argmax(1).cpu().numpy() == data.y[start:start + batch_size]).sum())
    return correct / len(data)


def transfer(method: str, pretrained: nn.Module, task: TransferTask, cfg: TransferConfig, *,
             feature_fn: FeatureFn = penultimate_features) -> TransferResult:
    """Transfer `pretrained` to `task` with `method`: build its training set (selection on the pretrained model),
    give a copy a fresh head for the target classes, finetune, and test. `pretrained` is left unchanged."""
    chosen = training_set(method, pretrained, task, cfg, feature_fn=feature_fn)
    start = with_fresh_head(pretrained, task.num_classes, cfg.seed)
    run = finetune_on(start, chosen.data, cfg)
    return TransferResult(method, run.model, run.trained_ids, len(chosen.data), chosen.selected_pool_index,
                          accuracy_on(run.model, task.test))


# ----------------------------------------------------------------------------------------------------------------
# Accuracy vs static fraction


@dataclass(frozen=True)
class TransferRow:
    """One cell of the transfer table: a method's test accuracy at one static fraction and seed."""

    method: str
    static_fraction: float
    seed: int
    test_accuracy: float
    train_examples: int  # size of the training set, duplicates counted
    seconds: float


def transfer_table(pretrained: nn.Module, target: ArrayData, auxiliary: ArrayData, test: ArrayData, *,
                   static_fractions: Sequence[float], seeds: Sequence[int], cfg: TransferConfig,
                   methods: Sequence[str] = TRANSFER_METHODS,
                   feature_fn: FeatureFn = penultimate_features) -> list[TransferRow]:
    """Test accuracy of every method at every static fraction and seed: the seed picks the static/non-static split
    (`split_static`), the head initialisation and the data order. Rows in (fraction, seed, method) order."""
    rows = []
    for fraction in static_fractions:
        for seed in seeds:
            task = TransferTask(target, split_static(len(target), fraction, seed), auxiliary, test)
            seeded = dataclasses.replace(cfg, seed=seed)
            for method in methods:
                began = time.perf_counter()
                result = transfer(method, pretrained, task, seeded, feature_fn=feature_fn)
                rows.append(TransferRow(method, fraction, seed, result.test_accuracy, result.train_examples,
                                        time.perf_counter() - began))
    return rows


def format_transfer_table(rows: Sequence[TransferRow]) -> str:
    """A markdown table: one line per static fraction, one column per method, mean ± sd test accuracy in %."""
    methods = list(dict.fromkeys(r.method for r in rows))
    fractions = sorted({r.static_fraction for r in rows})
    lines = ["| static fraction | " + " | ".join(methods) + " | seeds |", "|---:|" + "---:|" * (len(methods) + 1)]
    for fraction in fractions:
        cells = []
        seeds = set()
        for method in methods:
            values = [100 * r.test_accuracy for r in rows if r.method == method and r.static_fraction == fraction]
            seeds.update(r.seed for r in rows if r.method == method and r.static_fraction == fraction)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}" if values else "-")
        lines.append(f"| {fraction:.2f} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return "\n".join(lines)
