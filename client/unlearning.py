"""The client side of the unlearn experiment: forget sets, the DEL mask, the freeze mask, freeze-mode training, the
masked-values transport of the DEL rounds and FedEraser's calibration rounds.

Forget sets (`forget_split`, the one function the server and the clients both use, deterministic from the run's
seed): positions into a client's training examples (`client.handlers.local_data` order), split into the forget and
the retain part by `unlearn.forget`:
- `client`: all of client `unlearn.client`'s examples (it withdraws); the others forget nothing.
- `client-samples`: a random `unlearn.forget-fraction` of client `unlearn.client`'s examples (it keeps training on
  the rest); the others forget nothing.
- `uniform`: every client forgets a random `unlearn.forget-fraction` of its examples.
- `class`: every client forgets a random `unlearn.forget-fraction` of its examples of class `unlearn.forget-class`
  (1.0: the whole class), and nothing else: a forget set made of one class.
A fraction f of n candidates forgets exactly round(f * n) of them.

Handlers (registered in `client.handlers.HANDLERS`; `client.client_app` imports this module):
- `query.unlearn_mask` (`MASK_MESSAGE`, sent to the client holding the forget set): DEL's localization
  (`mask_from_score_shares` of `del_scores`: weighted gradient of the negated loss on this client's forget part, per
  output channel, the top `alpha` of all parameters; the same mask as `del_mask`) of the received model; the reply
  is the mask as packed bits (`pack_parameter_mask`), 1 bit per parameter entry: the scores never leave.
- `query.unlearn_scores` (`SCORES_MESSAGE`, sent to every client holding forget examples when the forget set is
  spread over clients, `uniform` / `class`): DEL's localization scores (`del_scores`: one per output channel of a
  tensor with ndim > 1, one per entry of a 1-D tensor) of the received model on this client's forget part, before
  any selection; the reply is the flat score vector (`flatten_unit_scores`, `named_parameters` order) in the
  config's `score-dtype` (float32 or float16) and the number of forget examples behind it. The server combines the
  clients' vectors and selects (`server.experiments.unlearning`).
- `query.unlearn_freeze` (`FREEZE_MESSAGE`, sent to the clients of the unlearning rounds): keep the freeze mask
  (True = may change) in Context.state with its fingerprint, and, when the message carries them (masked-values
  transport), the frozen values: the received model's values outside the mask; reply the fingerprint computed here.
- `train.unlearn` (`TRAIN_MESSAGE`): a train round on this client's retain part (`forget_split`); the forget part
  never reaches a gradient. When the message names a freeze fingerprint (`freeze-fingerprint` other than
  `NO_FREEZE`), training runs in freeze mode: after every optimiser step every entry outside the installed freeze
  mask is written back to its received value, so its update is exactly 0.0 and the FedAvg aggregate leaves it
  bit-identical. A message naming a mask this client does not hold fails with `FreezeMaskMissing` (the server then
  installs it: `FREEZE_MISSING` is in the error's text). When its `mask-fingerprint` is the freeze fingerprint
  (masked-values transport), the message carries only the trainable values and the buffers (`freeze_layout`
  order) and the reply only their updates; the model trained is the same, bit for bit, as with the dense model.
  With `calibration-fraction` r < 1 in the config (FedEraser), it trains on ceil(r * n) of its n retain examples,
  a seeded random subset: r x the local steps of a full round.

Masks are dicts {parameter name: bool tensor of its shape} over `model.named_parameters()`, packed in that order.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from client.handlers import (
    client_data,
    handler,
    local_data,
    local_update,
    model_and_layout,
    receive_model,
    task_of,
    train_reply,
)
from fedsparse import sparse, transport
from fedsparse.train import pick_device
from fedsparse.unlearning.core import ArrayData, Mask, UnlearnConfig
from fedsparse.unlearning.localization import select_top_fraction, weighted_mean_scores
from fedsparse.unlearning.methods.deletion_by_localization import del_scores

MASK_MESSAGE = "query.unlearn_mask"
SCORES_MESSAGE = "query.unlearn_scores"
SCORE_DTYPES = {"float32": np.float32, "float16": np.float16}  # unlearn.score-dtype -> the reply's dtype
FREEZE_MESSAGE = "query.unlearn_freeze"
TRAIN_MESSAGE = "train.unlearn"
NO_FREEZE = "none"
FREEZE_BITS, FREEZE_INFO, FREEZE_FROZEN = "unlearn-freeze", "unlearn-freeze-info", "unlearn-freeze-frozen"
FREEZE_MISSING = "holds no matching freeze mask"  # in FreezeMaskMissing's text: the server re-installs


class FreezeMaskMissing(RuntimeError):
    """A `train.unlearn` message names a freeze mask this client does not hold (never installed, or another)."""


# ------------------------------------------------------------------------------------------------ forget sets


@dataclass(frozen=True)
class ForgetSplit:
    """Positions into one client's training examples: `forget` (the forget set's part on this client) and `retain`
    (the rest), both sorted, disjoint, together all positions."""

    retain: np.ndarray
    forget: np.ndarray


def _draw(candidates: np.ndarray, fraction: float, seed: int, partition_id: int) -> np.ndarray:
    """round(fraction * len(candidates)) of `candidates`, drawn without replacement, seeded by (seed, partition)."""
    rng = np.random.default_rng([seed, partition_id, 0x0F0E])
    count = round(fraction * len(candidates))
    return np.sort(rng.choice(candidates, size=count, replace=False)) if count else np.zeros(0, dtype=np.int64)


def forget_split(cfg: dict, partition_id: int, labels: np.ndarray) -> ForgetSplit:
    """The forget and retain positions of client `partition_id`, whose training labels are `labels`, for the run's
    `unlearn.forget` (module docstring); the same on the server and on every client."""
    mode, chosen, fraction = cfg["unlearn.forget"], cfg["unlearn.client"], cfg["unlearn.forget-fraction"]
    positions = np.arange(len(labels), dtype=np.int64)
    if mode == "client":
        forget = positions if partition_id == chosen else positions[:0]
    elif mode == "client-samples":
        forget = _draw(positions, fraction, cfg["seed"], partition_id) if partition_id == chosen else positions[:0]
    elif mode == "uniform":
        forget = _draw(positions, fraction, cfg["seed"], partition_id)
    elif mode == "class":
        forget = _draw(positions[np.asarray(labels) == cfg["unlearn.forget-class"]], fraction, cfg["seed"],
                       partition_id)
    else:
        raise ValueError(f"unknown forget set {mode!r}")
    keep = np.ones(len(labels), dtype=bool)
    keep[forget] = False
    return ForgetSplit(retain=positions[keep], forget=forget.astype(np.int64))


def client_parts(cfg: dict, partition_id: int, x: np.ndarray, y: np.ndarray) -> tuple[ArrayData, ArrayData]:
    """(retain, forget) parts of this client's training examples (x, y) as float32 / int64 ArrayData."""
    split = forget_split(cfg, partition_id, y)

    def part(index: np.ndarray) -> ArrayData:
        return ArrayData(np.ascontiguousarray(x[index], dtype=np.float32), np.ascontiguousarray(y[index],
                                                                                                dtype=np.int64))

    return part(split.retain), part(split.forget)


def calibration_subset(num_examples: int, fraction: float, seed: int) -> np.ndarray:
    """FedEraser's calibration round: ceil(fraction * num_examples) positions out of num_examples, sorted, seeded."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = math.ceil(fraction * num_examples)
    return np.sort(np.random.default_rng(seed).choice(num_examples, size=count, replace=False))


# ------------------------------------------------------------------------------------------------ masks


def pack_parameter_mask(mask: Mask, model: nn.Module) -> np.ndarray:
    """The mask as packed bits (uint8), 1 bit per entry of every parameter in `model.named_parameters()` order; a
    parameter absent from the mask packs as all False."""
    parts = [mask[name].reshape(-1).cpu().numpy().astype(bool) if name in mask else np.zeros(p.numel(), dtype=bool)
             for name, p in model.named_parameters()]
    return np.packbits(np.concatenate(parts))


def unpack_parameter_mask(bits: np.ndarray, model: nn.Module) -> Mask:
    """The inverse of `pack_parameter_mask`; ValueError when `bits` has not the size `model` needs."""
    total = sum(p.numel() for p in model.parameters())
    bits = np.asarray(bits, dtype=np.uint8).reshape(-1)
    if len(bits) != (total + 7) // 8:
        raise ValueError(f"a parameter mask of this model has {(total + 7) // 8} bytes, got {len(bits)}")
    flat = np.unpackbits(bits)[:total].astype(bool)
    mask, start = {}, 0
    for name, p in model.named_parameters():
        mask[name] = torch.from_numpy(flat[start:start + p.numel()].copy()).reshape(p.shape)
        start += p.numel()
    return mask


def mask_fingerprint(bits: np.ndarray) -> str:
    """A short hash of packed mask bits (what the server and the client compare)."""
    return hashlib.sha256(np.ascontiguousarray(bits, dtype=np.uint8).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ScoreShare:
    """DEL's unit scores of one part of the forget set (`del_scores` on it) and the number of its examples."""

    scores: dict[str, torch.Tensor]
    num_examples: int


def mask_from_score_shares(shares: list[ScoreShare], model: nn.Module, alpha: float) -> Mask:
    """DEL's localization mask from the unit scores of one or more parts of the forget set: their forget-size
    weighted mean (`weighted_mean_scores`), then the top `alpha` of all of `model`'s parameters in whole units
    (`select_top_fraction`). The one selection of both paths: the forget-set holder's mask (one share) and the
    server's mask of a forget set spread over clients; with one share it is `del_mask`'s mask, bit for bit."""
    if any(share.num_examples < 1 for share in shares):
        raise ValueError("every score share needs at least one forget example behind it")
    combined = weighted_mean_scores([(share.scores, float(share.num_examples)) for share in shares])
    return select_top_fraction(combined, {name: p.shape for name, p in model.named_parameters()}, alpha)


def unit_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of DEL's unit scores per parameter: [out_channels] for a tensor with ndim > 1, else its own."""
    return {name: (p.shape[0],) if p.ndim > 1 else tuple(p.shape) for name, p in model.named_parameters()}


def flatten_unit_scores(scores: dict[str, torch.Tensor], model: nn.Module, dtype: str = "float32") -> np.ndarray:
    """DEL's unit scores as one flat vector in `model.named_parameters()` order, cast to `dtype` (a key of
    `SCORE_DTYPES`); ValueError when a parameter's scores have not the shape `unit_shapes` gives."""
    if dtype not in SCORE_DTYPES:
        raise ValueError(f"unknown score dtype {dtype!r}; known: {', '.join(SCORE_DTYPES)}")
    parts = []
    for name, shape in unit_shapes(model).items():
        values = scores[name].detach().cpu()
        if tuple(values.shape) != shape:
            raise ValueError(f"{name}: unit scores of shape {tuple(values.shape)}, expected {shape}")
        parts.append(values.reshape(-1).numpy())
    return np.concatenate(parts).astype(SCORE_DTYPES[dtype])


def unflatten_unit_scores(flat: np.ndarray, model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `flatten_unit_scores` (float32 tensors); ValueError when `flat` is not a finite float
    vector of the length the model's units need."""
    shapes = unit_shapes(model)
    expected = sum(math.prod(shape) for shape in shapes.values())
    flat = np.asarray(flat)
    if flat.dtype.kind != "f":
        raise ValueError(f"unit scores must be floats, got dtype {flat.dtype}")
    if flat.shape != (expected,):
        raise ValueError(f"this model has {expected} unit scores, got shape {flat.shape}")
    if not np.isfinite(flat).all():
        raise ValueError(f"{int((~np.isfinite(flat)).sum())} of the unit scores are not finite")
    scores, start = {}, 0
    for name, shape in shapes.items():
        count = math.prod(shape)
        scores[name] = torch.from_numpy(flat[start:start + count].astype(np.float32)).reshape(shape)
        start += count
    return scores


# -------------------------------------------------------------------------------- masked-values transport


def freeze_layout(model: nn.Module) -> sparse.Layout:
    """The layout of the masked-values transport: every parameter is "maskable" (by the freeze mask, in
    `named_parameters` order), the buffers (BatchNorm statistics) always travel dense."""
    return sparse.Layout.of(model.state_dict(), [name for name, _ in model.named_parameters()])


def complement(mask: Mask) -> Mask:
    """The entries a mask leaves out."""
    return {name: ~keep for name, keep in mask.items()}


def merge_frozen(trainable_values: torch.Tensor, buffers: torch.Tensor, frozen_values: torch.Tensor,
                 layout: sparse.Layout, trainable: Mask) -> sparse.State:
    """The full state from the trainable values, the buffers (`sparse.gather` order in `layout`) and the frozen
    values (the entries outside `trainable`, same order): every entry is copied, none computed."""
    inside = sparse.scatter(trainable_values, buffers, layout, trainable)
    outside = sparse.scatter(frozen_values, buffers, layout, complement(trainable))
    return {name: torch.where(trainable[name], inside[name], outside[name]) if name in trainable else inside[name]
            for name in inside}


class FreezeOutsideMask:
    """A `fedsparse.train.StepCallback` keeping every entry outside `mask` at its value in `frozen` (the received
    model): after each optimiser step it is written back, bit for bit."""

    def __init__(self, frozen: dict[str, torch.Tensor], mask: Mask) -> None:
        self.frozen, self.mask = frozen, mask

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> None:
        """Write the frozen values back (after optimiser step `step`)."""
        for name, p in model.named_parameters():
            keep = self.mask[name].to(p.device)
            p.copy_(torch.where(keep, p, self.frozen[name].to(p.device)))


def forget_share(content: RecordDict, cfg: dict, partition_id: int) -> tuple[torch.nn.Module, ScoreShare]:
    """The message's model (on the CPU) and DEL's unit scores of it on this client's forget part, with the number
    of forget examples; ValueError when this client holds no forget example."""
    net, _ = model_and_layout(cfg)
    net.load_state_dict(content["model"].to_torch_state_dict())
    x, y = local_data(cfg, partition_id)
    _, forget = client_parts(cfg, partition_id, x, y)
    if not len(forget):
        raise ValueError(f"partition {partition_id} holds no example of the forget set: nothing to localize")
    device = pick_device(cfg["device"])
    net.to(device)
    scores = del_scores(net, forget, UnlearnConfig(batch_size=cfg["batch-size"], device=str(device)))
    net.cpu()
    return net, ScoreShare(scores, len(forget))


# ------------------------------------------------------------------------------------------------ handlers


@handler(MASK_MESSAGE)
def unlearn_mask(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """The client holding the forget set: DEL's localization mask of the received model on its forget part, as
    packed bits; ValueError when this client holds no forget example."""
    net, share = forget_share(content, cfg, partition_id)
    mask = mask_from_score_shares([share], net, float(content["config"]["alpha"]))
    bits = pack_parameter_mask(mask, net)
    return RecordDict({"mask": ArrayRecord({"bits": Array(bits)}),
                       "metrics": MetricRecord({"selected": int(sum(int(m.sum()) for m in mask.values())),
                                                "num-examples": share.num_examples, "partition-id": partition_id})})


@handler(SCORES_MESSAGE)
def unlearn_scores(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """A client holding forget examples: DEL's unit scores of the received model on its forget part, flat, in the
    config's `score-dtype`, with the number of forget examples; ValueError when it holds none."""
    net, share = forget_share(content, cfg, partition_id)
    flat = flatten_unit_scores(share.scores, net, str(content["config"].get("score-dtype", "float32")))
    return RecordDict({"scores": ArrayRecord({"scores": Array(flat)}),
                       "metrics": MetricRecord({"num-examples": share.num_examples, "partition-id": partition_id})})


@handler(FREEZE_MESSAGE)
def install_freeze(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Keep the freeze mask (and the frozen values, when sent); reply the fingerprint of what was stored."""
    net, _ = model_and_layout(cfg)
    bits = content["mask"]["bits"].numpy()
    trainable = unpack_parameter_mask(bits, net)  # checks the size
    fingerprint = mask_fingerprint(bits)
    frozen = None
    if "frozen" in content:
        layout = freeze_layout(net)
        frozen = content["frozen"]["values"].numpy()
        expected = sparse.num_values(layout, complement(trainable))[0]
        if frozen.shape != (expected,):
            raise ValueError(f"the frozen values must be {expected} float32 entries, got shape {frozen.shape}")
    state[FREEZE_BITS] = ArrayRecord({"bits": Array(np.array(bits, dtype=np.uint8, copy=True))})
    if frozen is not None:
        state[FREEZE_FROZEN] = ArrayRecord({"values": Array(np.array(frozen, dtype=np.float32, copy=True))})
    elif FREEZE_FROZEN in state:
        del state[FREEZE_FROZEN]
    state[FREEZE_INFO] = ConfigRecord({"fingerprint": fingerprint})
    return RecordDict({"config": ConfigRecord({"fingerprint": fingerprint}),
                       "metrics": MetricRecord({"partition-id": partition_id})})


def held_fingerprint(state: RecordDict) -> str:
    """The fingerprint of the freeze mask this client holds (`NO_FREEZE`: none)."""
    return str(state[FREEZE_INFO]["fingerprint"]) if FREEZE_INFO in state else NO_FREEZE


def freeze_callback(content: RecordDict, state: RecordDict, cfg: dict) -> FreezeOutsideMask | None:
    """The freeze callback a `train.unlearn` message asks for (None: no freeze); FreezeMaskMissing when the mask
    it names is not the one installed here."""
    wanted = str(content["config"].get("freeze-fingerprint", NO_FREEZE))
    if wanted == NO_FREEZE:
        return None
    held = held_fingerprint(state)
    if held != wanted:
        raise FreezeMaskMissing(f"the server trains in freeze mask {wanted}, this client {FREEZE_MISSING} "
                                f"(holds {held})")
    received = receive_model(content, state, cfg)
    frozen = {name: p.detach().clone() for name, p in received.net.named_parameters()}
    return FreezeOutsideMask(frozen, unpack_parameter_mask(state[FREEZE_BITS]["bits"].numpy(), received.net))


def dense_content(content: RecordDict, state: RecordDict, cfg: dict) -> RecordDict:
    """A masked-values train message turned into the dense one the server would have sent: the installed frozen
    values, the message's trainable values and buffers; FreezeMaskMissing when this client lacks the mask or the
    frozen values."""
    config = content["config"]
    wanted = str(config["mask-fingerprint"])
    if held_fingerprint(state) != wanted or FREEZE_FROZEN not in state:
        raise FreezeMaskMissing(f"the server sends the values of freeze mask {wanted}; this client "
                                f"{FREEZE_MISSING} with its frozen values (holds {held_fingerprint(state)})")
    net, layout = model_and_layout(cfg)
    values_layout = freeze_layout(net)
    trainable = unpack_parameter_mask(state[FREEZE_BITS]["bits"].numpy(), net)
    values, buffers = transport.read_payload(content["arrays"], values_layout, trainable, "float32")
    frozen = torch.from_numpy(state[FREEZE_FROZEN]["values"].numpy().copy())
    full = merge_frozen(values, buffers, frozen, values_layout, trainable)
    _, flat = sparse.gather(full, layout, None)
    dense_config = ConfigRecord(dict(config.items()))
    dense_config["mask-fingerprint"] = sparse.NO_MASK
    return RecordDict({"arrays": transport.make_payload(torch.zeros(0), flat, "float32"), "config": dense_config})


def values_reply(update_dense: torch.Tensor, metrics: MetricRecord, content: RecordDict, state: RecordDict,
                 cfg: dict) -> RecordDict:
    """The reply of a masked-values round: the dense update (the client's usual layout) cut to the trainable values
    and the buffers, tagged with the freeze fingerprint."""
    net, layout = model_and_layout(cfg)
    values_layout = freeze_layout(net)
    trainable = unpack_parameter_mask(state[FREEZE_BITS]["bits"].numpy(), net)
    update = sparse.split_flat(update_dense, layout, layout.maskable + layout.dense)
    values, buffers = sparse.gather(update, values_layout, trainable)
    config = content["config"]
    return RecordDict({"arrays": transport.make_payload(values, buffers, "float32"), "metrics": metrics,
                       "config": ConfigRecord({"mask-fingerprint": str(config["mask-fingerprint"]),
                                               "server-round": int(config["server-round"])})})


@handler(TRAIN_MESSAGE)
def unlearn_train(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """A train round of the unlearning phase on this client's retain part: in freeze mode when the message says so,
    from masked values when it carries them, on a calibration subset when it asks for one (module docstring)."""
    masked_values = str(content["config"].get("mask-fingerprint", sparse.NO_MASK)) == str(
        content["config"].get("freeze-fingerprint", NO_FREEZE))
    received = dense_content(content, state, cfg) if masked_values else content
    callback = freeze_callback(received, state, cfg)
    x, y = client_data(cfg, task_of(received, cfg), partition_id)
    retain, _ = client_parts(cfg, partition_id, x, y)
    fraction = float(received["config"].get("calibration-fraction", 1.0))
    if fraction < 1.0:
        seed = (cfg["seed"] * 1_000_003 + int(received["config"]["server-round"]) * 10_007 + partition_id) % 2**63
        subset = calibration_subset(len(retain), fraction, seed)
        retain = ArrayData(retain.x[subset], retain.y[subset])
    update = local_update(received, state, cfg, partition_id, data=(retain.x, retain.y),
                          callbacks=() if callback is None else (callback,))
    if masked_values:
        return values_reply(update.dense, update.metrics, content, state, cfg)
    return train_reply(update, content)
