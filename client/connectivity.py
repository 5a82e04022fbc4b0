"""The client side of the connectivity experiment: train this client's own model, from its own seed, round after
round.

Handler (registered in `client.handlers.HANDLERS`; `client.client_app` imports this module):
- `train.connectivity` (`TRAIN_MESSAGE`): client `i` trains its own model for `local-epochs` epochs on the run's
  dataset: all of its training set (`conn.data = "full"`, `train-subset` capped: independent runs on one task,
  as in the linear-mode-connectivity papers) or its own partition (`conn.data = "partition"`). In its first round
  the model starts from this client's own initial model (`own_init_seed`: never the server's model, never
  another client's), in later rounds from the model it kept in Context.state (`conn-model`). The received global
  model is not trained on: it is only the reference of the reply, whose update is `own model - received model`,
  so the server reads the client's model back as `received + update` (float32 round-off only).

At discovery a connectivity client reports the examples it trains on (`training_examples`, registered in
`client.handlers.EXAMPLE_BOUNDS`): the bound of every train reply's `num-examples`.

Invariants: what a client keeps (its model) lives in Context.state, so it travels with the client-state
snapshots that make a resumed run exact; client i's initial model, data and data order depend only on the run
config, its partition id and the round.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from client.handlers import LocalUpdate, example_bound, handler, local_data, receive_model, train_reply
from fedsparse import sparse
from fedsparse.data import load_dataset
from fedsparse.models import build_model
from fedsparse.train import TrainConfig, pick_device, train_local

TRAIN_MESSAGE = "train.connectivity"
OWN_MODEL = "conn-model"


def own_init_seed(cfg: dict, partition_id: int) -> int:
    """The seed of client `partition_id`'s initial model: distinct per client and never the run's `seed` itself
    (the server's initial model)."""
    return (cfg["seed"] * 1_000_003 + 104_729 * (partition_id + 1) + 17) % (2**32)


def own_init_state(cfg: dict, partition_id: int) -> dict[str, torch.Tensor]:
    """Client `partition_id`'s initial model as a state dict; the server rebuilds the same one (trajectory round 0)."""
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    model = build_model(cfg["model"], data.input_shape, data.num_classes, seed=own_init_seed(cfg, partition_id))
    return model.state_dict()


def training_data(cfg: dict, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """What client `partition_id` trains on: the whole (train-subset capped) training set with `conn.data = full`,
    its own partition with `conn.data = partition`."""
    if cfg["conn.data"] == "partition":
        return local_data(cfg, partition_id)
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    keep = cfg["train-subset"] or None
    return data.x_train[:keep], data.y_train[:keep]


def train_seed(cfg: dict, server_round: int, partition_id: int) -> int:
    """The data-order seed of one client's training in one round."""
    return (cfg["seed"] * 1_000_003 + server_round * 10_007 + 31 * partition_id + 5) % (2**63)


@handler(TRAIN_MESSAGE)
def train_own_model(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Train this client's own model for `local-epochs` epochs; reply `own model - received model`."""
    received = receive_model(content, state, cfg)
    net, layout = received.net, received.layout
    if received.masks is not None:
        raise ValueError("the connectivity experiment trains dense models; the message names a mask")
    values0, dense0 = sparse.gather({k: v.detach().clone() for k, v in net.state_dict().items()}, layout, None)
    if OWN_MODEL in state:
        net.load_state_dict(state[OWN_MODEL].to_torch_state_dict())
    else:
        net.load_state_dict(own_init_state(cfg, partition_id))
    x, y = training_data(cfg, partition_id)
    config = content["config"]
    server_round = int(config["server-round"])
    settings = TrainConfig(cfg["local-epochs"], cfg["batch-size"], float(config["lr"]), cfg["momentum"],
                           cfg["weight-decay"], cfg["grad-clip"], optimizer=cfg["optimizer"])
    loss = train_local(net, x, y, settings, seed=train_seed(cfg, server_round, partition_id),
                       device=pick_device(cfg["device"]))
    own = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    values, dense = sparse.gather(own, layout, None)
    metrics = MetricRecord({"num-examples": len(y), "train-loss": loss, "partition-id": partition_id})
    reply = train_reply(LocalUpdate(values - values0, dense - dense0, received.fingerprint, metrics), content)
    state[OWN_MODEL] = ArrayRecord({key: Array(np.ascontiguousarray(value.numpy())) for key, value in own.items()})
    return reply


@example_bound("connectivity")
def training_examples(cfg: dict, partition_id: int) -> int:
    """What a connectivity client reports at discovery: the examples it trains on (the bound of its replies)."""
    return len(training_data(cfg, partition_id)[1])
