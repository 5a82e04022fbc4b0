"""One validation path for every client reply, train or query: each field is read through the typed getters here.

Invariants (what a reply that leaves this module without a ReplyError satisfies):
- every record it needs is present and of the right kind (ArrayRecord / MetricRecord / ConfigRecord);
- integers are Python ints (no bool, no float), inside the stated bounds; floats are finite numbers;
- a node's `partition-id` is the one it claimed at discovery, and its `num-examples` is at most what it reported
  at discovery (so no client can raise its own weight after the server has counted it);
- a train reply echoes the round it was asked for (`server-round` in its config record) and the fingerprint of
  the current mask, so an earlier round's update or another mask's values never reach the aggregate.

The arrays themselves (lengths, dtypes, finiteness) are checked by `fedsparse.transport.read_payload` and the
strategies' decoders, which raise the same ReplyError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsparse.transport import ReplyError


@dataclass(frozen=True)
class NodeInfo:
    """What a node told the server at discovery: its partition and how many training examples it holds."""

    partition_id: int
    num_examples: int


@dataclass(frozen=True)
class TrainReply:
    """A train reply whose fields are all valid; `arrays` still has to be decoded by the strategy."""

    partition_id: int
    num_examples: int
    train_loss: float
    arrays: ArrayRecord


@dataclass(frozen=True)
class SaliencyReply:
    partition_id: int
    num_examples: int
    scores: Array


@dataclass(frozen=True)
class InstallReply:
    partition_id: int
    fingerprint: str


# ------------------------------------------------------------------------------------------- field getters


def get_record(content: RecordDict, key: str, kind: type) -> ArrayRecord | MetricRecord | ConfigRecord:
    """The record `key` of a reply, which must exist and be of type `kind`."""
    if key not in content:
        raise ReplyError(f"reply lacks the record '{key}'")
    record = content[key]
    if not isinstance(record, kind):
        raise ReplyError(f"record '{key}' is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def get_int(record: MetricRecord | ConfigRecord, key: str, low: int, high: int) -> int:
    """An integer field in [low, high] (a bool or a float, even a whole one, is rejected)."""
    if key not in record:
        raise ReplyError(f"reply lacks '{key}'")
    value = record[key]
    if type(value) is not int:
        raise ReplyError(f"'{key}' must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ReplyError(f"'{key}' is {value}, outside [{low}, {high}]")
    return value


def get_float(record: MetricRecord | ConfigRecord, key: str) -> float:
    """A finite number (int or float, not bool)."""
    if key not in record:
        raise ReplyError(f"reply lacks '{key}'")
    value = record[key]
    if type(value) not in (int, float):
        raise ReplyError(f"'{key}' must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ReplyError(f"'{key}' must be finite, got {value!r}")
    return float(value)


def get_str(record: ConfigRecord, key: str) -> str:
    if key not in record:
        raise ReplyError(f"reply lacks '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise ReplyError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _partition(metrics: MetricRecord, node: NodeInfo) -> int:
    value = get_int(metrics, "partition-id", 0, 2**62)
    if value != node.partition_id:
        raise ReplyError(f"partition-id {value} is not the partition {node.partition_id} this node claimed at "
                         "discovery")
    return value


def _examples(metrics: MetricRecord, node: NodeInfo) -> int:
    value = get_int(metrics, "num-examples", 1, 2**62)
    if value > node.num_examples:
        raise ReplyError(f"num-examples {value} exceeds the {node.num_examples} this node reported at discovery")
    return value


# ------------------------------------------------------------------------------------------ reply readers


def read_info(content: RecordDict, num_clients: int, max_examples: int) -> NodeInfo:
    """A `query.info` reply: partition id in [0, num_clients), example count in [1, max_examples]."""
    metrics = get_record(content, "metrics", MetricRecord)
    return NodeInfo(get_int(metrics, "partition-id", 0, num_clients - 1),
                    get_int(metrics, "num-examples", 1, max_examples))


def read_train(content: RecordDict, node: NodeInfo | None, server_round: int, fingerprint: str) -> TrainReply:
    """A train reply from `node` (None: a node the server never discovered) to round `server_round`, made
    with the mask whose fingerprint is `fingerprint`."""
    if node is None:
        raise ReplyError("the node was never discovered (no query.info reply)")
    metrics = get_record(content, "metrics", MetricRecord)
    arrays = get_record(content, "arrays", ArrayRecord)
    n = _examples(metrics, node)
    config = get_record(content, "config", ConfigRecord) if "config" in content else None
    got_fp = get_str(config, "mask-fingerprint") if config is not None and "mask-fingerprint" in config \
        else "(none)"
    if got_fp != fingerprint:
        raise ReplyError(f"mask fingerprint {got_fp!r} is not the current mask's {fingerprint!r}")
    got_round = get_int(config, "server-round", 0, 2**62)
    if got_round != server_round:
        raise ReplyError(f"reply is for server-round {got_round}, this is round {server_round} (stale reply)")
    return TrainReply(_partition(metrics, node), n, get_float(metrics, "train-loss"), arrays)


def read_saliency(content: RecordDict, node: NodeInfo | None) -> SaliencyReply:
    """A `query.saliency` reply: the `scores` ArrayRecord with one Array `saliency` (shape checked by SSFL)."""
    if node is None:
        raise ReplyError("the node was never discovered (no query.info reply)")
    scores = get_record(content, "scores", ArrayRecord)
    if "saliency" not in scores:
        raise ReplyError("reply lacks scores: no 'saliency' array")
    metrics = get_record(content, "metrics", MetricRecord)
    return SaliencyReply(_partition(metrics, node), _examples(metrics, node), scores["saliency"])


def read_install(content: RecordDict, node: NodeInfo | None) -> InstallReply:
    """A `query.install_mask` reply: the fingerprint of the mask the node stored."""
    if node is None:
        raise ReplyError("the node was never discovered (no query.info reply)")
    config = get_record(content, "config", ConfigRecord)
    metrics = get_record(content, "metrics", MetricRecord)
    return InstallReply(_partition(metrics, node), get_str(config, "fingerprint"))
