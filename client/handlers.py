"""What a client does for each message action, as plain functions over records.

`HANDLERS` maps a Flower message type ("train", "train.<name>", "query.<name>") to a handler
`(content, state, cfg, partition_id) -> RecordDict`. The ClientApp (`client.client_app`) only looks the handler up; a
new strategy that needs a new client action registers one with `@handler("query.<name>")` (here, or in its own
module of `client/` that `client.client_app` imports, as `client.continual` does).

The data a train message trains on is `client_data(cfg, task, partition_id)`, with `task = config["task"]` of the
message (default: the run's dataset).

`state` is the node's Context.state: it keeps the installed mask between rounds (in deployment every message is
a fresh process, so nothing else survives), and the ClientApp keeps a copy of it on the node's disk after every
handler that succeeded, so a resumed run restores it (`client.state`). A handler writes it last, once nothing
left can fail. A node whose state lost the mask (a restarted SuperNode) answers a sparse train message with
`MaskMissing`, whose text carries `sparse.MASK_MISSING`: the server then re-installs.

Every train reply echoes, in its `config` record, the round it answers (`server-round`) and the fingerprint of
the mask it used (`mask-fingerprint`): the server rejects a reply bound to another round or mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsparse import codec, sparse, transport
from fedsparse.data import client_split, input_stats, load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.topk import encode_topk_update
from fedsparse.train import Objective, StepCallback, TrainConfig, pick_device, saliency_scores, train_local
from fedsparse.transport import TOPK_RESIDUAL, topk_arrays

Handler = Callable[[RecordDict, RecordDict, dict, int], RecordDict]
HANDLERS: dict[str, Handler] = {}


def handler(message_type: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of `message_type` ("train", "train.<name>", "evaluate",
    "query.<name>"); a second registration of the same type replaces the first."""
    category, _, action = message_type.partition(".")
    if category not in ("train", "evaluate", "query") or (action and not action.isidentifier()):
        raise ValueError(f"message type must be train, evaluate or query, optionally '.<identifier>'; "
                         f"got {message_type!r}")

    def wrap(fn: Handler) -> Handler:
        HANDLERS[message_type] = fn
        return fn

    return wrap


# ------------------------------------------------------------------------------------------------ helpers


@lru_cache(maxsize=2)
def _template(model: str, dataset: str, data_root: str, layers: str) -> tuple[torch.nn.Module, sparse.Layout]:
    ds = load_dataset(dataset, data_root)
    net = build_model(model, ds.input_shape, ds.num_classes, seed=0)
    return net, sparse.Layout.of(net.state_dict(), maskable_names(net, tuple(layers.split(","))))


def model_and_layout(cfg: dict) -> tuple[torch.nn.Module, sparse.Layout]:
    """A model of the run's architecture (weights to be overwritten) and its mask layout, cached per process."""
    return _template(cfg["model"], cfg["dataset"], cfg["data-root"], cfg["sparse.mask-layers"])


def local_data(cfg: dict, partition_id: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """This client's share of the run's dataset: its train examples, or with `split="val"` its held-out ones."""
    ds = load_dataset(cfg["dataset"], cfg["data-root"])
    train_idx, val_idx = client_split(cfg, partition_id)
    idx = train_idx if split == "train" else val_idx
    return ds.x_train[idx], ds.y_train[idx]


def task_of(content: RecordDict, cfg: dict) -> str:
    """The data view a message asks for: its config record's `task`, else the run's dataset."""
    config = content.get("config", {})
    return str(config.get("task", cfg["dataset"]))


def client_data(cfg: dict, task: str, partition_id: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The examples this client trains on for `task` (the run's dataset: its partition of it, `local_data`; a
    stream task such as "domains:usps": its partition of that task, `fedsparse.tasks.client_data`)."""
    if task == cfg["dataset"]:
        return local_data(cfg, partition_id, split)
    from fedsparse.tasks import client_data as task_data

    return task_data(task, cfg, partition_id, split)


class MaskMissing(RuntimeError):
    """The server sent values for a mask this node does not hold (never installed, or its state was lost)."""


def installed_masks(state: RecordDict, layout: sparse.Layout) -> tuple[sparse.Masks, str] | None:
    if "mask" not in state:
        return None
    bits = state["mask"]["bits"].numpy()
    return sparse.unpack_mask(bits, layout), str(state["mask-info"]["fingerprint"])


def _masks_for(content: RecordDict, state: RecordDict, layout: sparse.Layout) -> tuple[sparse.Masks | None, str]:
    """The mask the server says this payload uses; it must be the one installed here."""
    wanted = str(content["config"].get("mask-fingerprint", sparse.NO_MASK))
    if wanted == sparse.NO_MASK:
        return None, wanted
    installed = installed_masks(state, layout)
    if installed is None or installed[1] != wanted:
        have = installed[1] if installed else "none"
        raise MaskMissing(f"{sparse.MASK_MISSING}: server sent values for mask {wanted}, this client has mask "
                          f"{have}")
    return installed[0], wanted


@dataclass(frozen=True)
class ReceivedModel:
    """The model a message carries, loaded into this process's network, and the mask its values are packed in."""

    net: torch.nn.Module
    layout: sparse.Layout
    masks: sparse.Masks | None
    fingerprint: str


@dataclass(frozen=True)
class LocalUpdate:
    """What local training produced: the masked-value and dense updates (float32), the fingerprint of the mask
    they were made in, and the reply's metrics."""

    values: torch.Tensor
    dense: torch.Tensor
    fingerprint: str
    metrics: MetricRecord


def receive_model(content: RecordDict, state: RecordDict, cfg: dict) -> ReceivedModel:
    """Load the message's model (values in the installed mask + dense tensors); MaskMissing if the mask it names
    is not the one installed here."""
    net, layout = model_and_layout(cfg)
    masks, fingerprint = _masks_for(content, state, layout)
    dtype = str(content["config"].get("value-dtype", "float32"))
    values, dense = transport.read_payload(content["arrays"], layout, masks, dtype)
    net.load_state_dict(sparse.scatter(values, dense, layout, masks))
    return ReceivedModel(net, layout, masks, fingerprint)


def _received(net: torch.nn.Module, layout: sparse.Layout, masks: sparse.Masks | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse.gather({k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, layout, masks)


def _seed(cfg: dict, server_round: int, partition_id: int) -> int:
    return (cfg["seed"] * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


# ----------------------------------------------------------------------------------------------- handlers


ExampleBound = Callable[[dict, int], int]
EXAMPLE_BOUNDS: dict[str, ExampleBound] = {}
"""Experiment name -> (cfg, partition id) -> the examples a client of that experiment reports at discovery, when
its data is not the run's dataset (a continual client: all its tasks; a merge client: its task)."""


def example_bound(experiment: str) -> Callable[[ExampleBound], ExampleBound]:
    """Register the decorated function as the discovery example count of `experiment`'s clients."""
    def wrap(fn: ExampleBound) -> ExampleBound:
        EXAMPLE_BOUNDS[experiment] = fn
        return fn

    return wrap


@handler("query.info")
def info(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Who am I: lets the server map its random node ids to partitions, so sampling is reproducible. The example
    count bounds every later reply's `num-examples` (`EXAMPLE_BOUNDS` for experiments whose data is not the
    run's dataset)."""
    bound = EXAMPLE_BOUNDS.get(cfg["experiment"])
    examples = bound(cfg, partition_id) if bound is not None else len(local_data(cfg, partition_id)[0])
    return RecordDict({"metrics": MetricRecord({"partition-id": partition_id, "num-examples": examples})})


def local_update(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int, *,
                 data: tuple[np.ndarray, np.ndarray] | None = None, objective: Objective | None = None,
                 callbacks: Sequence[StepCallback] = ()) -> LocalUpdate:
    """Train the received model on this client's data and return the update. Without a mask every tensor is in
    the dense update.

    A client procedure may replace the data (default: `client_data` of the message's task), the objective and the
    after-step callbacks (see `fedsparse.train.train_local`)."""
    received = receive_model(content, state, cfg)
    net, layout, masks = received.net, received.layout, received.masks
    values0, dense0 = _received(net, layout, masks)
    conf = content["config"]
    x, y = data if data is not None else client_data(cfg, task_of(content, cfg), partition_id)
    settings = TrainConfig(cfg["local-epochs"], cfg["batch-size"], float(conf["lr"]), cfg["momentum"],
                           cfg["weight-decay"], cfg["grad-clip"], optimizer=cfg["optimizer"],
                           augment=cfg.get("augment", "none"), normalize=input_stats(cfg))
    # the procedure's seams go to train_local only when used, so the default call is the same as before them
    procedure = {"objective": objective} if objective is not None else {}
    if callbacks:
        procedure["callbacks"] = callbacks
    loss = train_local(net, x, y, settings, seed=_seed(cfg, int(conf["server-round"]), partition_id), masks=masks,
                       device=pick_device(cfg["device"]), **procedure)
    values, dense = _received(net, layout, masks)
    metrics = MetricRecord({"num-examples": len(x), "train-loss": loss, "partition-id": partition_id})
    return LocalUpdate(values - values0, dense - dense0, received.fingerprint, metrics)


def train_reply(update: LocalUpdate, content: RecordDict) -> RecordDict:
    """The reply to a train message: the update as a payload in the message's value-dtype, the metrics, and the
    echoed round and mask fingerprint the server checks."""
    config = content["config"]
    return RecordDict({
        # the update, not the weights: in float16/bfloat16 a weight would swallow a change below 1e-3 of it
        "arrays": transport.make_payload(update.values, update.dense, str(config.get("value-dtype", "float32"))),
        "metrics": update.metrics,
        "config": ConfigRecord({"mask-fingerprint": update.fingerprint, "server-round": int(config["server-round"])}),
    })


@handler("train")
def train(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """A FedAvg round inside the installed mask (if any): train locally, reply the update."""
    return train_reply(local_update(content, state, cfg, partition_id), content)


@handler("query.saliency")
def saliency(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """SSFL step 1: |w * dL/dw| at the shared initialisation, on this client's own data."""
    received = receive_model(content, state, cfg)
    net, layout = received.net, received.layout
    x, y = local_data(cfg, partition_id)
    scores = saliency_scores(net, x, y, list(layout.maskable), batch_size=cfg["batch-size"],
                             batches=cfg["sparse.saliency-batches"], seed=_seed(cfg, 0, partition_id),
                             device=pick_device(cfg["device"]), augment=cfg.get("augment", "none"),
                             normalize=input_stats(cfg))
    flat = torch.cat([scores[k].reshape(-1) for k in layout.maskable])
    return RecordDict({
        "scores": ArrayRecord({"saliency": Array(saliency_upload(flat, content["config"]))}),
        "metrics": MetricRecord({"num-examples": len(x), "partition-id": partition_id}),
    })


def saliency_upload(flat: torch.Tensor, config: ConfigRecord) -> np.ndarray:
    """The `saliency` array a client sends: float32 scores by default; in `saliency-dtype` (float16, or bfloat16
    as uint16 bits) if the query says so; and with `saliency-keep` k' > 0, only the k' highest scores (ties: the
    earlier position) as one fedsparse.codec buffer (uint8) of positions + values."""
    dtype = str(config.get("saliency-dtype", "float32"))
    keep = int(config.get("saliency-keep", 0))
    if keep <= 0:
        return transport.to_wire(flat, dtype)
    values = flat.detach().cpu().float().numpy()
    positions = np.sort(np.argsort(-values, kind="stable")[:keep])
    buffer = codec.encode_sparse(values.size, positions, values[positions], dtype)
    return np.frombuffer(buffer, dtype=np.uint8).copy()


@handler("query.install_mask")
def install_mask(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Keep the server's mask; answer with the fingerprint computed here, so the server can check it arrived."""
    _, layout = model_and_layout(cfg)
    bits = content["mask"]["bits"].numpy()
    sparse.unpack_mask(bits, layout)  # checks the size
    fp = sparse.fingerprint(bits)
    if fp != str(content["config"]["fingerprint"]):
        raise RuntimeError(f"mask arrived damaged: fingerprint {fp}, server says {content['config']['fingerprint']}")
    state["mask"] = ArrayRecord({"bits": Array(bits)})
    state["mask-info"] = ConfigRecord({"fingerprint": fp})
    return RecordDict({"config": ConfigRecord({"fingerprint": fp}),
                       "metrics": MetricRecord({"partition-id": partition_id})})


# ------------------------------------------------------------------------------- top-k with error feedback

@handler("train.topk")
def topk_train(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Train on the dense global model, reply the top-k of (update + residual) as codec bytes."""
    result = local_update(content, state, cfg, partition_id)  # no mask: the whole update is dense
    update = result.dense.numpy()
    residual = state[TOPK_RESIDUAL]["residual"].numpy() if TOPK_RESIDUAL in state else None
    if residual is not None and residual.shape != update.shape:  # another model: the old residual is meaningless
        residual = None
    dtype = str(content["config"].get("value-dtype", "float32"))
    buf, residual = encode_topk_update(update, residual, cfg["sparse.topk-density"], dtype)
    state[TOPK_RESIDUAL] = ArrayRecord({"residual": Array(residual)})
    return RecordDict({"arrays": topk_arrays(buf), "metrics": result.metrics,
                       "config": ConfigRecord({"mask-fingerprint": result.fingerprint,
                                               "server-round": int(content["config"]["server-round"])})})
