"""The client side of the transfer experiment: transfer unlearning by data selection as federated rounds.

Data views, deterministic for the run's seed and the same on the server and every client:
- source examples: the client's training split (`client.handlers.local_data`) restricted to the classes below
  `transfer.source-classes`;
- target examples: the rest of its training split. `static_mask` marks which of them are static (usable forever);
  the others are non-static: their owners may withdraw them at any time;
- the auxiliary static pool (`auxiliary_pool`): the first `transfer.aux-size` target-class training images AFTER the
  federation's `train-subset` prefix, so no client's partition holds one; every client holds the same pool (public
  data, as in the paper).

Handlers (registered in `client.handlers.HANDLERS`; `client.client_app` imports this module):
- `train.transfer` (`TRAIN_MESSAGE`): its config's `stage` says what to train on: `pretrain` the source examples;
  `static_only` the static target examples; `all_data` every target example; `data_selection` the static target
  examples plus the pool images selected for the non-static ones, each labelled with its query's label.
- `query.transfer_select` (`SELECT_MESSAGE`, data_selection only, once at the transfer phase's start, carrying the
  pretrained model): the classifier head's input features of the client's non-static examples and of the pool, the
  `transfer.neighbours` nearest pool images of every non-static example (`fedsparse.unlearning.transfer`), kept in
  Context.state; the reply says how many were selected. Nothing about the non-static examples leaves the client.

Invariant: `training_examples` is this module's only path from data to `train_local`. Every example it returns
carries its dataset index as id, and for every stage of the transfer phase no id is a non-static example's: the
non-static data chooses training data, it is never trained on (tested by instrumenting the data path).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from client.handlers import example_bound, handler, local_update, model_and_layout, train_reply
from fedsparse.data import client_split, load_dataset
from fedsparse.unlearning.core import ArrayData
from fedsparse.unlearning.transfer import (
    TRANSFER_METHODS,
    IndexedData,
    penultimate_features,
    select_neighbours,
    split_static,
)

TRAIN_MESSAGE = "train.transfer"
SELECT_MESSAGE = "query.transfer_select"
PRETRAIN = "pretrain"
STAGES: tuple[str, ...] = (PRETRAIN, *TRANSFER_METHODS)
SELECTION = "transfer-selection"


class SelectionMissing(RuntimeError):
    """A data_selection round reached a client that holds no selection (its state was lost, or it joined after the
    selection exchange): it cannot train without training on what it must not."""


def own_examples(cfg: dict, partition_id: int) -> IndexedData:
    """This client's training split, each example with its dataset index as id."""
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    index = client_split(cfg, partition_id)[0]
    return IndexedData(np.ascontiguousarray(data.x_train[index], dtype=np.float32),
                       data.y_train[index].astype(np.int64), index.astype(np.int64))


def _subset(data: IndexedData, keep: np.ndarray) -> IndexedData:
    return IndexedData(data.x[keep], data.y[keep], data.ids[keep])


def source_examples(cfg: dict, partition_id: int) -> IndexedData:
    """The client's examples of the source classes (below `transfer.source-classes`)."""
    own = own_examples(cfg, partition_id)
    return _subset(own, own.y < cfg["transfer.source-classes"])


def target_examples(cfg: dict, partition_id: int) -> IndexedData:
    """The client's examples of the target classes (from `transfer.source-classes` on)."""
    own = own_examples(cfg, partition_id)
    return _subset(own, own.y >= cfg["transfer.source-classes"])


def static_mask(cfg: dict, partition_id: int, num_examples: int) -> np.ndarray:
    """Which of the client's target examples are static: `transfer.static-fraction` of them, seeded per client."""
    return split_static(num_examples, cfg["transfer.static-fraction"], seed=cfg["seed"] * 1_000_003 + partition_id)


def auxiliary_pool(cfg: dict) -> IndexedData:
    """The public static pool: the first `transfer.aux-size` target-class training images after `train-subset`."""
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    start = cfg["train-subset"]
    candidates = start + np.flatnonzero(data.y_train[start:] >= cfg["transfer.source-classes"])
    if not start or len(candidates) < cfg["transfer.aux-size"]:
        raise ValueError(f"the auxiliary pool needs {cfg['transfer.aux-size']} target-class training images after "
                         f"train-subset={start}; there are {len(candidates) if start else 0}")
    index = candidates[: cfg["transfer.aux-size"]]
    return IndexedData(np.ascontiguousarray(data.x_train[index], dtype=np.float32),
                       data.y_train[index].astype(np.int64), index.astype(np.int64))


def training_examples(cfg: dict, partition_id: int, stage: str, state: RecordDict) -> IndexedData:
    """What a `train.transfer` round of `stage` trains on (module docstring); SelectionMissing for data_selection
    without a selection in `state`."""
    if stage == PRETRAIN:
        return source_examples(cfg, partition_id)
    if stage not in TRANSFER_METHODS:
        raise ValueError(f"unknown transfer stage {stage!r}; known: {', '.join(STAGES)}")
    target = target_examples(cfg, partition_id)
    if stage == "all_data":
        return target
    static = _subset(target, static_mask(cfg, partition_id, len(target)))
    if stage == "static_only":
        return static
    if SELECTION not in state:
        raise SelectionMissing("data_selection: this client holds no selection of pool images (query."
                               "transfer_select never reached it, or its state was lost)")
    chosen, labels = state[SELECTION]["pool-ids"].numpy(), state[SELECTION]["labels"].numpy()
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    selected = IndexedData(np.ascontiguousarray(data.x_train[chosen], dtype=np.float32), labels.astype(np.int64),
                           chosen.astype(np.int64))
    return IndexedData.concatenate([static, selected])


@example_bound("transfer")
def transfer_examples(cfg: dict, partition_id: int) -> int:
    """What a transfer client reports at discovery: the most examples any of its stages trains on."""
    return len(own_examples(cfg, partition_id)) * max(1, cfg["transfer.neighbours"])


@handler(SELECT_MESSAGE)
def select(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Select the pool images nearest to each non-static example in the received (pretrained) model's features."""
    net, _ = model_and_layout(cfg)
    net.load_state_dict(content["model"].to_torch_state_dict())
    target = target_examples(cfg, partition_id)
    non_static = _subset(target, ~static_mask(cfg, partition_id, len(target)))
    pool = auxiliary_pool(cfg)
    if len(non_static):
        neighbours = select_neighbours(penultimate_features(net, ArrayData(non_static.x, non_static.y)),
                                       penultimate_features(net, ArrayData(pool.x, pool.y)), cfg["transfer.neighbours"])
        chosen = pool.ids[neighbours.pool_index.reshape(-1)]
        labels = np.repeat(non_static.y, cfg["transfer.neighbours"])
    else:
        chosen, labels = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    state[SELECTION] = ArrayRecord({"pool-ids": Array(chosen.astype(np.int64)), "labels": Array(labels)})
    return RecordDict({"metrics": MetricRecord({"selected": len(chosen), "distinct": len(np.unique(chosen)),
                                                "non-static": len(non_static), "partition-id": partition_id})})


@handler(TRAIN_MESSAGE)
def transfer_train(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """A FedAvg round on the data its stage names (`training_examples`)."""
    examples = training_examples(cfg, partition_id, str(content["config"]["stage"]), state)
    update = local_update(content, state, cfg, partition_id, data=(examples.x, examples.y))
    return train_reply(update, content)


__all__ = ["PRETRAIN", "SELECTION", "SELECT_MESSAGE", "STAGES", "TRAIN_MESSAGE", "SelectionMissing",
           "auxiliary_pool", "own_examples", "source_examples", "static_mask", "target_examples",
           "training_examples"]
