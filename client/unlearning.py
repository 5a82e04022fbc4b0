"""The client side of the unlearn experiment (client withdrawal): the DEL mask, the freeze mask, freeze-mode training.

Handlers (registered in `client.handlers.HANDLERS`; `client.client_app` imports this module):
- `query.unlearn_mask` (`MASK_MESSAGE`, sent to the withdrawing client only): DEL's localization
  (`fedsparse.unlearning.methods.deletion_by_localization.del_mask`: weighted gradient of the negated loss on this
  client's own training data, per output channel, the top `alpha` of all parameters) of the received model; the
  reply is the mask as packed bits (`pack_parameter_mask`), 1 bit per parameter entry: the scores never leave.
- `query.unlearn_freeze` (`FREEZE_MESSAGE`, sent to the remaining clients): keep the freeze mask (True = may
  change) in Context.state with its fingerprint; reply the fingerprint computed here.
- `train.unlearn` (`TRAIN_MESSAGE`): the plain train round; when the message names a freeze fingerprint
  (`freeze-fingerprint` other than `NO_FREEZE`), training runs in freeze mode: after every optimiser step every
  entry outside the installed freeze mask is written back to its received value, so its update is exactly 0.0 and
  the FedAvg aggregate leaves it bit-identical. A message naming a mask this client does not hold fails with
  `FreezeMaskMissing`.

Masks are dicts {parameter name: bool tensor of its shape} over `model.named_parameters()`, packed in that order.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from client.handlers import handler, local_data, local_update, model_and_layout, receive_model, train_reply
from fedsparse.train import pick_device
from fedsparse.unlearning.core import ArrayData, Mask, UnlearnConfig
from fedsparse.unlearning.methods.deletion_by_localization import del_mask

MASK_MESSAGE = "query.unlearn_mask"
FREEZE_MESSAGE = "query.unlearn_freeze"
TRAIN_MESSAGE = "train.unlearn"
NO_FREEZE = "none"
FREEZE_BITS, FREEZE_INFO = "unlearn-freeze", "unlearn-freeze-info"


class FreezeMaskMissing(RuntimeError):
    """A `train.unlearn` message names a freeze mask this client does not hold (never installed, or another)."""


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


@handler(MASK_MESSAGE)
def unlearn_mask(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """The withdrawing client: DEL's localization mask of the received model on its own data, as packed bits."""
    net, _ = model_and_layout(cfg)
    net.load_state_dict(content["model"].to_torch_state_dict())
    config = content["config"]
    x, y = local_data(cfg, partition_id)
    device = pick_device(cfg["device"])
    net.to(device)
    settings = UnlearnConfig(batch_size=cfg["batch-size"], del_alpha=float(config["alpha"]), device=str(device))
    mask = del_mask(net, ArrayData(x.astype(np.float32), y.astype(np.int64)), settings)
    net.cpu()
    bits = pack_parameter_mask(mask, net)
    return RecordDict({"mask": ArrayRecord({"bits": Array(bits)}),
                       "metrics": MetricRecord({"selected": int(sum(int(m.sum()) for m in mask.values())),
                                                "num-examples": len(y), "partition-id": partition_id})})


@handler(FREEZE_MESSAGE)
def install_freeze(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Keep the freeze mask; reply the fingerprint of what was stored."""
    net, _ = model_and_layout(cfg)
    bits = content["mask"]["bits"].numpy()
    unpack_parameter_mask(bits, net)  # checks the size
    fingerprint = mask_fingerprint(bits)
    state[FREEZE_BITS] = ArrayRecord({"bits": Array(np.array(bits, dtype=np.uint8, copy=True))})
    state[FREEZE_INFO] = ConfigRecord({"fingerprint": fingerprint})
    return RecordDict({"config": ConfigRecord({"fingerprint": fingerprint}),
                       "metrics": MetricRecord({"partition-id": partition_id})})


def freeze_callback(content: RecordDict, state: RecordDict, cfg: dict) -> FreezeOutsideMask | None:
    """The freeze callback a `train.unlearn` message asks for (None: no freeze); FreezeMaskMissing when the mask
    it names is not the one installed here."""
    wanted = str(content["config"].get("freeze-fingerprint", NO_FREEZE))
    if wanted == NO_FREEZE:
        return None
    held = str(state[FREEZE_INFO]["fingerprint"]) if FREEZE_INFO in state else NO_FREEZE
    if held != wanted:
        raise FreezeMaskMissing(f"the server trains in freeze mask {wanted}, this client holds {held}")
    received = receive_model(content, state, cfg)
    frozen = {name: p.detach().clone() for name, p in received.net.named_parameters()}
    return FreezeOutsideMask(frozen, unpack_parameter_mask(state[FREEZE_BITS]["bits"].numpy(), received.net))


@handler(TRAIN_MESSAGE)
def unlearn_train(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """A train round of the unlearning phase: the plain train round, in freeze mode when the message says so."""
    callback = freeze_callback(content, state, cfg)
    update = local_update(content, state, cfg, partition_id, callbacks=() if callback is None else (callback,))
    return train_reply(update, content)
