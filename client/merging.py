"""The client side of the merge experiment: train this client's expert on its own task of the stream.

Handler (registered in `client.handlers.HANDLERS`; `client.client_app` imports this module):
- `train.merge` (`TRAIN_MESSAGE`): client `i` trains its expert on task `i` of `merge.stream` (all of that task's
  training examples, `merge.train-size` capped) for the message's `expert-epochs` epochs. The expert starts, in
  its first round, from the received global model (`merge.local = true`) or from this client's own initial model
  (`expert_init_seed`; non-local), and in later rounds from the expert it kept in Context.state (`merge-expert`).
  The reply is the plain train reply whose update is `expert - received model`, so the server reads the expert
  back as `received + update` (float32 round-off only).

- `query.merge_tact`: TACT's per-task variance correction (`fedsparse.merging.statistics`): the per-channel
  statistics of this client's expert at `tact_layers` on its calibration examples (the first `tact-examples` of
  its task's training set), and the per-channel affines that give the received merged model those statistics on
  the same examples (`fit_corrections`, layer after layer); the reply is the record `corrections` with
  `<layer>.scale` and `<layer>.shift` per layer (a few hundred floats). When the message carries the record
  `permutation` (the server aligned this expert), the expert is permuted by it first. The corrected layers never
  include the head, so the corrections are the same whether the head is shared or per task (`merge.task-heads`).

At discovery a merge client reports its task's training examples (`task_examples`, registered in
`client.handlers.EXAMPLE_BOUNDS`): the bound of every train reply's `num-examples`.

Invariants: what a client keeps (its expert) lives in Context.state, so it travels with the client-state snapshots
that make a resumed run exact; the task of client i and its initial model depend only on the run config.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from client.handlers import LocalUpdate, example_bound, handler, receive_model, train_reply
from fedsparse import sparse
from fedsparse.alignment import apply_permutation, permutation_spec
from fedsparse.merging.statistics import ChannelAffine, fit_corrections, record_channel_stats
from fedsparse.models import build_model
from fedsparse.tasks import NUM_CLASSES, Task, stream_tasks
from fedsparse.train import TrainConfig, pick_device, train_local

TRAIN_MESSAGE = "train.merge"
TACT_MESSAGE = "query.merge_tact"
EXPERT = "merge-expert"


def task_config(cfg: dict) -> dict:
    """The run config as `fedsparse.tasks` reads it for a merge run: the merge.* caps in the cl.* keys the task
    views read, and one task per client."""
    return {**cfg, "cl.train-size": cfg["merge.train-size"], "cl.test-size": cfg["merge.test-size"],
            "cl.num-tasks": cfg["num-clients"]}


def merge_tasks(cfg: dict) -> list[Task]:
    """The tasks of a merge run in client order (task i is client i's): the first `num-clients` of the stream."""
    return stream_tasks(cfg["merge.stream"], task_config(cfg))


def expert_init_seed(cfg: dict, partition_id: int) -> int:
    """The seed of client `partition_id`'s own initial model in a non-local run (never the shared model's seed)."""
    return (cfg["seed"] * 1_000_003 + 7919 * (partition_id + 1) + 31) % (2**32)


def expert_init_state(cfg: dict, partition_id: int, input_shape: tuple[int, ...]) -> dict:
    """Client `partition_id`'s own initial model (non-local), as a state dict; the server rebuilds the same one."""
    return build_model(cfg["model"], input_shape, NUM_CLASSES, seed=expert_init_seed(cfg, partition_id)).state_dict()


def _tensors(record: ArrayRecord) -> dict:
    return record.to_torch_state_dict()


@handler(TRAIN_MESSAGE)
def train_expert(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Train this client's expert for `expert-epochs` epochs on its task; reply `expert - received model`."""
    received = receive_model(content, state, cfg)
    net, layout, masks = received.net, received.layout, received.masks
    if masks is not None:
        raise ValueError("the merge experiment trains dense experts; the message names a mask")
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    values0, dense0 = sparse.gather(start, layout, None)
    task = merge_tasks(cfg)[partition_id]
    if EXPERT in state:
        net.load_state_dict(_tensors(state[EXPERT]))
    elif not cfg["merge.local"]:
        net.load_state_dict(expert_init_state(cfg, partition_id, task.input_shape))
    config = content["config"]
    settings = TrainConfig(int(config["expert-epochs"]), cfg["batch-size"], float(config["lr"]), cfg["momentum"],
                           cfg["weight-decay"], cfg["grad-clip"], optimizer=cfg["optimizer"])
    seed = (cfg["seed"] * 1_000_003 + int(config["server-round"]) * 10_007 + partition_id) % (2**63)
    loss = train_local(net, task.x_train, task.y_train, settings, seed=seed, device=pick_device(cfg["device"]))
    expert = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    values, dense = sparse.gather(expert, layout, None)
    metrics = MetricRecord({"num-examples": len(task.y_train), "train-loss": loss, "partition-id": partition_id})
    reply = train_reply(LocalUpdate(values - values0, dense - dense0, received.fingerprint, metrics), content)
    state[EXPERT] = ArrayRecord({key: Array(np.ascontiguousarray(value.numpy())) for key, value in expert.items()})
    return reply


def _weight_layers(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)]


def tact_layers(model: torch.nn.Module) -> list[str]:
    """The layers TACT corrects, in forward order: every Linear and Conv2d output except the last (the head)."""
    return _weight_layers(model)[:-1]


def head_layer(model: torch.nn.Module) -> str:
    """The classifier head: the model's last Linear or Conv2d (what `merge.task-heads` keeps per task)."""
    names = _weight_layers(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to be its head")
    return names[-1]


def head_state(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """The entries of `state` that belong to layer `head` (its weight and bias), cloned."""
    return {key: value.detach().clone() for key, value in state.items() if key.startswith(head + ".")}


def calibration_batches(x: np.ndarray, examples: int, batch_size: int = 256) -> list[torch.Tensor]:
    """The first `examples` inputs of `x` as float32 batches (the statistics are over all of them together)."""
    inputs = torch.from_numpy(np.ascontiguousarray(x[:examples], dtype=np.float32))
    return list(inputs.split(batch_size))


def corrections_record(corrections: dict[str, ChannelAffine]) -> ArrayRecord:
    """TACT corrections as an ArrayRecord: `<layer>.scale`, `<layer>.shift`."""
    arrays = {}
    for layer, affine in corrections.items():
        arrays[f"{layer}.scale"] = Array(affine.scale.numpy().astype(np.float32))
        arrays[f"{layer}.shift"] = Array(affine.shift.numpy().astype(np.float32))
    return ArrayRecord(arrays)


@handler(TACT_MESSAGE)
def tact_corrections(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """The affines that give the received merged model this client's expert's per-channel statistics on its
    calibration examples; ValueError when this client has no expert yet."""
    if EXPERT not in state:
        raise ValueError("no expert trained on this client yet: TACT needs one")
    task = merge_tasks(cfg)[partition_id]
    batches = calibration_batches(task.x_train, int(content["config"]["tact-examples"]))
    expert = build_model(cfg["model"], task.input_shape, NUM_CLASSES)
    expert_state = _tensors(state[EXPERT])
    if "permutation" in content:  # the server aligned this expert: take its statistics in the merged order
        permutation = {name: torch.from_numpy(np.array(index.numpy(), dtype=np.int64))
                       for name, index in content["permutation"].items()}
        expert_state = apply_permutation(permutation_spec(cfg["model"], expert), permutation, expert_state)
    expert.load_state_dict(expert_state)
    layers = tact_layers(expert)
    targets = record_channel_stats(expert, layers, batches)
    merged = build_model(cfg["model"], task.input_shape, NUM_CLASSES)
    merged.load_state_dict(content["model"].to_torch_state_dict())
    corrections = fit_corrections(merged, targets, batches)
    return RecordDict({"corrections": corrections_record(corrections),
                       "metrics": MetricRecord({"partition-id": partition_id, "num-examples": len(batches)})})


@example_bound("merge")
def task_examples(cfg: dict, partition_id: int) -> int:
    """What a merge client reports at discovery: its task's training examples (the bound of its replies)."""
    return len(merge_tasks(cfg)[partition_id].y_train)
