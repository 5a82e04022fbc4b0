"""The model payload on the wire, shared by every strategy, and the byte accounting.

A payload is an ArrayRecord with two 1-D arrays: `values` (the masked weights in mask order) and `dense` (every
tensor that is not masked, concatenated). Dense FedAvg is the same payload with no mask: everything is `dense`.
Down, the payload carries the global weights; up, the client's update to them (trained minus received), so that
a low-precision format rounds the small update rather than the weight. Both arrays travel as `value-dtype`;
bfloat16 travels as its raw 16-bit words (uint16), because np.save, which Flower's Array uses, cannot write it.
The dtype table and the bfloat16 conversion are the codec's (`fedsparse.codec`), restricted to `value-dtype`'s choices.

`read_payload` checks a client's reply before anything is aggregated and raises ReplyError with the reason.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedsparse import codec
from fedsparse.config import VALUE_DTYPES
from fedsparse.sparse import Layout, Masks, num_values

WIRE_DTYPES = {name: codec.WIRE_DTYPES[name] for name in VALUE_DTYPES}  # value-dtype -> numpy dtype on the wire
VALUE_BYTES = {name: codec.VALUE_BYTES[name] for name in VALUE_DTYPES}
PAYLOAD_KEYS = ("values", "dense")


class ReplyError(ValueError):
    """A client reply that must not be aggregated; the message says why."""


def to_wire(x: torch.Tensor, value_dtype: str) -> np.ndarray:
    """A float tensor as the numpy array that travels."""
    flat = x.detach().cpu().float().reshape(-1).numpy()
    if value_dtype == "bfloat16":
        return codec.bfloat16_bits(flat)
    return flat.astype(WIRE_DTYPES[value_dtype])


def from_wire(a: np.ndarray, value_dtype: str) -> torch.Tensor:
    """Inverse of `to_wire` (float32 tensor)."""
    if value_dtype == "bfloat16":
        return torch.from_numpy(codec.bfloat16_to_float32(a))
    return torch.from_numpy(a.astype(np.float32))


def make_payload(values: torch.Tensor, dense: torch.Tensor, value_dtype: str) -> ArrayRecord:
    return ArrayRecord({"values": Array(to_wire(values, value_dtype)), "dense": Array(to_wire(dense, value_dtype))})


def read_payload(rec: ArrayRecord, layout: Layout, masks: Masks | None,
                 value_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, dense) float32 tensors from a payload, after checking keys, dtype, length and finiteness."""
    missing = [k for k in PAYLOAD_KEYS if k not in rec]
    if missing:
        raise ReplyError(f"payload lacks {', '.join(missing)}")
    extra = [k for k in rec if k not in PAYLOAD_KEYS]
    if extra:
        raise ReplyError(f"payload has unexpected arrays {', '.join(extra)}")
    n_values, n_dense = num_values(layout, masks)
    out = []
    for key, expected in (("values", n_values), ("dense", n_dense)):
        arr = rec[key]
        if arr.dtype != str(WIRE_DTYPES[value_dtype]):
            raise ReplyError(f"'{key}' has dtype {arr.dtype}, expected {WIRE_DTYPES[value_dtype]} ({value_dtype})")
        if tuple(arr.shape) != (expected,):
            raise ReplyError(f"'{key}' has shape {tuple(arr.shape)}, expected ({expected},)")
        try:
            t = from_wire(arr.numpy(), value_dtype)
        except Exception as err:  # a garbled npy buffer
            raise ReplyError(f"'{key}' cannot be decoded: {err}") from err
        if t.numel() != expected:
            raise ReplyError(f"'{key}' holds {t.numel()} values, expected {expected}")
        if not bool(torch.isfinite(t).all()):
            raise ReplyError(f"'{key}' contains NaN or Inf")
        out.append(t)
    return out[0], out[1]


def content_bytes(content: RecordDict) -> int:
    """Serialized payload bytes of a message's content: Flower's count_bytes() of each record."""
    return sum(rec.count_bytes() for rec in content.values())


def logical_payload_bytes(layout: Layout, masks: Masks | None, value_dtype: str) -> int:
    """Values x bytes per value, without any header."""
    return sum(num_values(layout, masks)) * VALUE_BYTES[value_dtype]


# ---- top-k replies: one Array holding raw codec bytes

TOPK_KEY = "update"  # the one Array of a top-k reply (`fedsparse.topk.encode_topk_update` bytes)
TOPK_STYPE = "fedsparse.codec"  # its Array.stype: raw codec bytes, no npy header
TOPK_RESIDUAL = "topk-residual"  # the ArrayRecord in the node state that carries what was not sent yet


def topk_arrays(buf: bytes) -> ArrayRecord:
    """The reply's ArrayRecord: one Array whose data is the codec buffer itself (count_bytes = len + key)."""
    return ArrayRecord({TOPK_KEY: Array(dtype="uint8", shape=(len(buf),), stype=TOPK_STYPE, data=buf)})
