"""What a client does for each message action, as plain functions over records.

`HANDLERS` maps a Flower message type ("train", "train.<name>", "query.<name>") to a handler
`(content, state, cfg, partition_id) -> RecordDict`. The ClientApp (`client.client_app`) only looks the handler up; a
new strategy that needs a new client action registers one with `@handler("query.<name>")` (here, or in its own
module of `client/`, as `client.continual` does) and names that module in `HANDLER_MODULES`: a lookup of a type not
registered yet imports its module then (a deployed ClientApp process imports only what its message needs). An
experiment whose clients report another discovery example count (`example_bound`) names its module in
`EXPERIMENT_MODULES`.

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

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsparse import codec, sparse, transport
from fedsparse.data import client_split, input_stats, load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.partition_cache import DatasetShape, cached_dataset_shape, cached_partition
from fedsparse.topk import encode_topk_update
from fedsparse.train import Objective, StepCallback, TrainConfig, pick_device, saliency_scores, train_local
from fedsparse.transport import TOPK_RESIDUAL, topk_arrays

Handler = Callable[[RecordDict, RecordDict, dict, int], RecordDict]

HANDLER_MODULES: dict[str, str] = {
    "query.info": "client.handlers", "query.install_mask": "client.handlers", "query.saliency": "client.handlers",
    "train": "client.handlers", "train.topk": "client.handlers",
    "train.connectivity": "client.connectivity",
    "query.cl_anchor": "client.continual", "query.cl_fisher": "client.continual", "train.continual": "client.continual",
    "train.lm": "client.language",
    "query.lmf_install": "client.language_facts", "query.lmf_mask": "client.language_facts",
    "train.lmf": "client.language_facts",
    "query.unlearn_freeze": "client.unlearning", "query.unlearn_mask": "client.unlearning",
    "query.unlearn_scores": "client.unlearning", "train.unlearn": "client.unlearning",
    "train.lmu": "client.language_unlearning",
    "query.merge_tact": "client.merging", "train.merge": "client.merging",
    "query.transfer_select": "client.transfer", "train.transfer": "client.transfer",
    "train.unlearn_local": "client.unlearning_local",
}
"""Every message type the ClientApp routes -> the module of `client/` that registers its handler. The module is
imported when the handler is first looked up (`HandlerRegistry`), so a ClientApp process imports only what its
message needs (tests/test_client_startup.py checks the table against the registrations)."""

EXPERIMENT_MODULES: dict[str, str] = {
    "connectivity": "client.connectivity", "continual": "client.continual", "lm": "client.language",
    "lm-mechanistic": "client.language_facts", "lm-unlearn": "client.language_unlearning",
    "merge": "client.merging", "transfer": "client.transfer",
}
"""Experiment -> the module that registers its clients' discovery example count (`example_bound`)."""


class HandlerRegistry(dict[str, "Handler"]):
    """Message type -> handler. Looking up a type that is not registered yet imports its module
    (`HANDLER_MODULES`), whose `@handler` registers it; a type in no module is a KeyError."""

    def __missing__(self, message_type: str) -> Handler:
        module = HANDLER_MODULES.get(message_type)
        if module is None:
            raise KeyError(f"no handler for message type {message_type!r}")
        importlib.import_module(module)
        if not dict.__contains__(self, message_type):
            raise KeyError(f"{module} did not register a handler for {message_type!r}")
        return dict.__getitem__(self, message_type)


HANDLERS: HandlerRegistry = HandlerRegistry()


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


def data_cache_dir(cfg: dict) -> Path:
    """Where clients keep their prepared partitions (`fedsparse.partition_cache`): `$FEDSPARSE_CACHE/client-data`
    when that is set, else `data-cache` beside the nodes' state snapshots (`<client-state-dir>`, by default
    `<output-dir>/client-state`)."""
    if os.environ.get("FEDSPARSE_CACHE"):
        return Path(os.environ["FEDSPARSE_CACHE"]) / "client-data"
    return Path(cfg["client-state-dir"] or Path(cfg["output-dir"]) / "client-state") / "data-cache"


def dataset_shape(cfg: dict) -> DatasetShape:
    """The run's dataset's example shape and class count, recorded on disk once so that a fresh process builds the
    model without loading the dataset."""
    def compute() -> DatasetShape:
        ds = load_dataset(cfg["dataset"], cfg["data-root"])
        return DatasetShape(ds.input_shape, ds.num_classes)

    return cached_dataset_shape(cfg, data_cache_dir(cfg), compute)


@lru_cache(maxsize=2)
def _template(model: str, input_shape: tuple[int, ...], num_classes: int, layers: str
              ) -> tuple[torch.nn.Module, sparse.Layout]:
    net = build_model(model, input_shape, num_classes, seed=0)
    return net, sparse.Layout.of(net.state_dict(), maskable_names(net, tuple(layers.split(","))))


def model_and_layout(cfg: dict) -> tuple[torch.nn.Module, sparse.Layout]:
    """A model of the run's architecture (weights to be overwritten) and its mask layout, cached per process."""
    shape = dataset_shape(cfg)
    return _template(cfg["model"], shape.input_shape, shape.num_classes, cfg["sparse.mask-layers"])


def _split_of(cfg: dict, partition_id: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = load_dataset(cfg["dataset"], cfg["data-root"])
    train_idx, val_idx = client_split(cfg, partition_id)
    idx = train_idx if split == "train" else val_idx
    return ds.x_train[idx], ds.y_train[idx]


def local_data(cfg: dict, partition_id: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """This client's share of the run's dataset: its train examples, or with `split="val"` its held-out ones.

    Prepared once on the node's disk (`fedsparse.partition_cache`, in `data_cache_dir`) and memory-mapped by later
    messages, so a deployed ClientApp process neither reads the dataset nor draws the partition again; the
    arrays are the same as computed afresh."""
    part = cached_partition(cfg, partition_id, "train" if split == "train" else "val", data_cache_dir(cfg),
                            compute=lambda: _split_of(cfg, partition_id, split))
    return part.x, part.y


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
    if cfg["experiment"] in EXPERIMENT_MODULES:  # registers the experiment's bound
        importlib.import_module(EXPERIMENT_MODULES[cfg["experiment"]])
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
    """SSFL step 1: |w * dL/dw| at the shared initialisation, on this client's own data (the initial model comes
    with the query, or is rebuilt here from the run's seed when the query carries only its fingerprint)."""
    if "arrays" in content:
        received = receive_model(content, state, cfg)
        net, layout = received.net, received.layout
    else:
        net, layout = rebuilt_initial_model(cfg, str(content["config"]["init-fingerprint"]))
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


class InitMismatch(RuntimeError):
    """The initial model rebuilt from the run's seed is not the server's (its fingerprint differs)."""


def rebuilt_initial_model(cfg: dict, server_fingerprint: str) -> tuple[torch.nn.Module, sparse.Layout]:
    """The run's seeded initial model built here, as the server built it, with its layout; InitMismatch if its
    state's fingerprint is not `server_fingerprint` (the server then sends the model)."""
    net, layout = model_and_layout(cfg)
    shape = dataset_shape(cfg)
    net.load_state_dict(build_model(cfg["model"], shape.input_shape, shape.num_classes, seed=cfg["seed"]).state_dict())
    mine = sparse.state_fingerprint(net.state_dict())
    if mine != server_fingerprint:
        raise InitMismatch(f"the initial model rebuilt from seed {cfg['seed']} has fingerprint {mine}, the server's "
                           f"{server_fingerprint} (another torch version, or a run not starting from the seeded init)")
    return net, layout


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
