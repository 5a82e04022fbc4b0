"""The client side of the continual experiment: its two one-off actions and the procedure of a train round.

Handlers (registered in `client.handlers.HANDLERS`; `client.client_app` imports this module):
- `train.continual`: a train round of the continual experiment (`TRAIN_MESSAGE`, sent by its FedAvg): the plain
  train handler's update and reply, with the method's data, objective and callbacks (`continual_procedure`).
- `query.cl_anchor`: keep the anchor (the previous task's final global model) and, for ewc, the aggregated
  Fisher in Context.state, tagged with the task they are for; reply that task.
- `query.cl_fisher`: the diagonal Fisher (mean squared per-example gradient of log p(y|x),
  `fedsparse.continual.penalties.estimate_fisher`) of the received model on this client's data of the task, over
  at most `fisher-examples` examples; reply it as the ArrayRecord `fisher` with `num-examples`.
`continual_procedure` updates the client's replay buffer and returns the round's data, objective and callbacks
(`fedsparse.continual.procedure.local_procedure`). A train reply's `num-examples` is the client's count of the
task's examples (replayed ones not included): at most `examples_bound`, what it reported at discovery.

Everything a client keeps lives in Context.state records (`cl-anchor`, `cl-fisher`, `cl-info`, `cl-replay`,
`cl-replay-info`), so it travels with the client-state snapshots that make a resumed run exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.handlers import example_bound, handler, local_update, model_and_layout, train_reply
from fedsparse.continual.penalties import FisherEstimate, estimate_fisher
from fedsparse.continual.procedure import (
    ContinualClientState,
    LocalProcedure,
    MethodSettings,
    ReplayIndex,
    local_procedure,
)
from fedsparse.continual.replay import ReplayBuffer
from fedsparse.tasks import client_data, stream_task_names
from fedsparse.train import pick_device

TRAIN_MESSAGE = "train.continual"
ANCHOR, FISHER, INFO, REPLAY, REPLAY_INFO = "cl-anchor", "cl-fisher", "cl-info", "cl-replay", "cl-replay-info"


def method_settings(cfg: dict) -> MethodSettings:
    """The client procedure's knobs from the resolved run config (the cl.* keys)."""
    return MethodSettings(cfg["cl.method"], penalty=cfg["cl.penalty"], sfa_p=cfg["cl.sfa-p"],
                          sfa_beta=cfg["cl.sfa-beta"], rounds_per_task=cfg["cl.rounds-per-task"],
                          replay_size=cfg["cl.replay-size"])


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.array(array.numpy(), copy=True)) for key, array in record.items()}


def load_client_state(state: RecordDict) -> ContinualClientState:
    """The continual state kept in Context.state (empty parts are None)."""
    info = state.get(INFO)
    anchor = _tensors(state[ANCHOR]) if ANCHOR in state else None
    fisher = None
    if FISHER in state and info is not None:
        fisher = FisherEstimate(_tensors(state[FISHER]), int(info["fisher-examples"]))
    replay = None
    if REPLAY in state and REPLAY_INFO in state:
        arrays = {key: array.numpy() for key, array in state[REPLAY].items()}
        replay = ReplayIndex.restore(arrays, dict(state[REPLAY_INFO]))
    return ContinualClientState(anchor, str(info["anchor-task"]) if info is not None else "", fisher, replay)


def save_replay(state: RecordDict, replay: ReplayIndex) -> None:
    """Write the replay index into Context.state."""
    arrays, scalars = replay.state()
    state[REPLAY] = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})
    state[REPLAY_INFO] = ConfigRecord(scalars)


def client_seed(cfg: dict, partition_id: int) -> int:
    """A client's seed for its replay buffer and its Fisher's sampled labels: one per (run seed, client)."""
    return (cfg["seed"] * 1_000_003 + partition_id * 7919 + 17) % (2**63)


@handler("query.cl_anchor")
def install_anchor(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Keep the anchor (and Fisher) for the task named in the config; reply that task."""
    task = str(content["config"]["task"])
    state[ANCHOR] = ArrayRecord({key: Array(np.array(array.numpy(), copy=True))
                                 for key, array in content["anchor"].items()})
    info = {"anchor-task": task, "fisher-examples": 0}
    if "fisher" in content:
        state[FISHER] = ArrayRecord({key: Array(np.array(array.numpy(), copy=True))
                                     for key, array in content["fisher"].items()})
        info["fisher-examples"] = int(content["config"]["fisher-examples"])
    state[INFO] = ConfigRecord(info)
    return RecordDict({"config": ConfigRecord({"task": task}),
                       "metrics": MetricRecord({"partition-id": partition_id})})


@handler("query.cl_fisher")
def fisher(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """The diagonal Fisher of the received model on this client's data of the task."""
    task = str(content["config"]["task"])
    limit = int(content["config"]["fisher-examples"])
    net, _ = model_and_layout(cfg)
    net.load_state_dict(content["model"].to_torch_state_dict())
    x, y = client_data(task, cfg, partition_id)
    estimate = estimate_fisher(net, x, y, max_examples=limit, seed=client_seed(cfg, partition_id),
                               device=pick_device(cfg["device"]))
    return RecordDict({
        "fisher": ArrayRecord({key: Array(value.numpy()) for key, value in estimate.diagonal.items()}),
        "metrics": MetricRecord({"num-examples": estimate.num_examples, "partition-id": partition_id}),
    })


def continual_procedure(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int, x: np.ndarray,
                        y: np.ndarray) -> LocalProcedure:
    """The data, objective and callbacks of this train round of a continual run (x, y: the client's data of the
    message's task). Replay: the task the client trained on before is over once another task's message arrives;
    it enters the buffer here, which is saved back into Context.state."""
    config = content["config"]
    task = str(config["task"])
    settings = method_settings(cfg)
    client_state = load_client_state(state)
    replay_data = None
    if settings.method == "replay":
        replay = client_state.replay or ReplayIndex(ReplayBuffer(settings.replay_size,
                                                                 seed=client_seed(cfg, partition_id)))
        replay.note_task(task, lambda name: client_data(name, cfg, partition_id)[1])
        save_replay(state, replay)
        if len(replay.buffer):
            replay_data = replay.examples(lambda name: client_data(name, cfg, partition_id))
    steps_per_round = cfg["local-epochs"] * math.ceil(
        (len(y) + (0 if replay_data is None else len(replay_data[1]))) / cfg["batch-size"])
    round_in_task = int(config["server-round"]) - int(config["cl-first-round"]) + 1
    return local_procedure(settings, client_state, task, x, y, steps_per_round=steps_per_round,
                           round_in_task=round_in_task, replay_data=replay_data)


@example_bound("continual")
def examples_bound(cfg: dict, partition_id: int) -> int:
    """The client's training examples summed over every task of the stream: what it reports at discovery, so no
    train reply of any task exceeds it."""
    return sum(len(client_data(name, cfg, partition_id)[1]) for name in stream_task_names(cfg["cl.stream"], cfg))


@handler(TRAIN_MESSAGE)
def continual_train(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """A train round of the continual experiment: local training with the method's procedure on the message's
    task; the reply is the plain train reply (the update as a payload, metrics, the echoed round)."""
    x, y = client_data(str(content["config"]["task"]), cfg, partition_id)
    procedure = continual_procedure(content, state, cfg, partition_id, x, y)
    update = local_update(content, state, cfg, partition_id, data=(procedure.x, procedure.y),
                          objective=procedure.objective, callbacks=procedure.callbacks)
    update.metrics["num-examples"] = len(y)  # the task's examples weigh the update, not the replayed ones
    return train_reply(update, content)
