"""The model payload on the wire, shared by every strategy, and the byte accounting.

A payload is an ArrayRecord with two 1-D arrays: `values` (the masked weights in mask order) and `dense` (every
tensor that is not masked, concatenated). Dense FedAvg is the same payload with no mask: everything is `dense`.
Down, the payload carries the global weights; up, the client's update to them (trained minus received), so that
a low-precision format rounds the small update rather than the weight. Both arrays travel as `value-dtype`;
bfloat16 travels as its raw 16-bit words (uint16), because np.save, which Flower's Array uses, cannot write it.
The dtype table and the bfloat16 conversion are the codec's (`fedsparse.codec`), restricted to `value-dtype`'s choices.

int8: each array travels as int8 codes in [-127, 127] plus one float32 scale per block of INT8_BLOCK consecutive
values (`values-scale`, `dense-scale`); a value is code x scale. A block's scale is its largest magnitude / 127
(at least the smallest normal float32, so every scale is finite and > 0), so nearest rounding is off by at most
scale / 2 per value and stochastic rounding (seeded, for determinism) is unbiased. A block holding NaN or Inf
travels with a NaN scale, which `read_payload` rejects, as it rejects NaN in the float formats.

`read_payload` checks a client's reply before anything is aggregated and raises ReplyError with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedsparse import codec
from fedsparse.config import VALUE_DTYPES
from fedsparse.sparse import Layout, Masks, num_values

WIRE_DTYPES = {name: codec.WIRE_DTYPES[name] for name in VALUE_DTYPES}  # value-dtype -> numpy dtype on the wire
VALUE_BYTES = {name: codec.VALUE_BYTES[name] for name in VALUE_DTYPES}
PAYLOAD_KEYS = ("values", "dense")
INT8_BLOCK = 256  # values per int8 scale: 4 bytes of scale per 256 bytes of codes (1.6%)
SCALE_KEYS = {"values": "values-scale", "dense": "dense-scale"}  # int8 only: the per-block scales of each array
ROUNDINGS = ("nearest", "stochastic")
_F32_TINY = float(np.finfo(np.float32).tiny)
_MAX_SCALE = float(np.finfo(np.float32).max) / 127  # a larger scale overflows float32 at code 127


class ReplyError(ValueError):
    """A client reply that must not be aggregated; the message says why."""


@dataclass(frozen=True)
class Int8Blocks:
    """A float vector as int8 codes (one per value) and float32 scales (one per block of INT8_BLOCK values)."""

    codes: np.ndarray
    scales: np.ndarray


def num_blocks(n: int) -> int:
    """Scales of an int8 array of n values."""
    return math.ceil(n / INT8_BLOCK)


def quantize_int8(x: torch.Tensor, rounding: str = "nearest", seed: int | None = None) -> Int8Blocks:
    """`x` (any shape, read flat) as int8 codes and per-block scales. `rounding`: "nearest", or "stochastic" with
    a `seed` (rounds up with probability equal to the fraction: unbiased, and the same for the same seed)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding needs a seed (runs must be reproducible)")
    flat = x.detach().cpu().reshape(-1).to(torch.float64).numpy()
    n = flat.size
    blocks = np.zeros(num_blocks(n) * INT8_BLOCK)
    blocks[:n] = flat
    blocks = blocks.reshape(-1, INT8_BLOCK)
    finite = np.isfinite(blocks).all(axis=1)
    blocks[~finite] = 0.0
    peak = np.abs(blocks).max(axis=1, initial=0.0)
    scales = np.clip(peak / 127, _F32_TINY, _MAX_SCALE).astype(np.float32)
    ratio = blocks / scales.astype(np.float64)[:, None]
    if rounding == "nearest":
        codes = np.rint(ratio)
    else:
        codes = np.floor(ratio + np.random.default_rng(seed).random(ratio.shape))
    codes = np.clip(codes, -127, 127).astype(np.int8).reshape(-1)[:n]
    scales[~finite] = np.nan
    return Int8Blocks(codes, scales)


def dequantize_int8(blocks: Int8Blocks) -> torch.Tensor:
    """Inverse of `quantize_int8` up to rounding: code x its block's scale, as a float32 tensor."""
    n = blocks.codes.size
    per_value = np.repeat(blocks.scales.astype(np.float32), INT8_BLOCK)[:n]
    return torch.from_numpy(blocks.codes.astype(np.float32) * per_value)


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


def payload_keys(value_dtype: str) -> tuple[str, ...]:
    """The arrays of a payload in `value_dtype`: values and dense, plus their scales for int8."""
    return PAYLOAD_KEYS + (tuple(SCALE_KEYS[k] for k in PAYLOAD_KEYS) if value_dtype == "int8" else ())


def make_payload(values: torch.Tensor, dense: torch.Tensor, value_dtype: str, *, rounding: str = "nearest",
                 seed: int | None = None) -> ArrayRecord:
    """The payload of (masked values, dense tensors) in `value_dtype`. `rounding` and `seed` apply to int8 only
    (see `quantize_int8`; values and dense draw from two streams derived from `seed`)."""
    if value_dtype != "int8":
        return ArrayRecord({"values": Array(to_wire(values, value_dtype)),
                            "dense": Array(to_wire(dense, value_dtype))})
    rng_seeds = [None, None] if seed is None else np.random.SeedSequence(seed).generate_state(2).tolist()
    arrays: dict[str, Array] = {}
    for key, x, part_seed in (("values", values, rng_seeds[0]), ("dense", dense, rng_seeds[1])):
        blocks = quantize_int8(x, rounding, part_seed)
        arrays[key] = Array(blocks.codes)
        arrays[SCALE_KEYS[key]] = Array(blocks.scales)
    return ArrayRecord(arrays)


def _checked_numpy(arr: Array, key: str, dtype: np.dtype, length: int, what: str) -> np.ndarray:
    """The numpy array of one payload Array, which must be a 1-D `dtype` array of `length` (ReplyError if not)."""
    if arr.dtype != str(dtype):
        raise ReplyError(f"'{key}' has dtype {arr.dtype}, expected {dtype} ({what})")
    if tuple(arr.shape) != (length,):
        raise ReplyError(f"'{key}' has shape {tuple(arr.shape)}, expected ({length},)")
    try:
        out = arr.numpy()
    except Exception as err:  # a garbled npy buffer
        raise ReplyError(f"'{key}' cannot be decoded: {err}") from err
    if out.dtype != dtype or out.size != length:
        raise ReplyError(f"'{key}' holds {out.size} values of {out.dtype}, expected {length} of {dtype}")
    return out


def _decode(rec: ArrayRecord, key: str, expected: int, value_dtype: str) -> torch.Tensor:
    """One array of a payload as a float32 tensor of `expected` values; ReplyError if anything is off."""
    wire = _checked_numpy(rec[key], key, WIRE_DTYPES[value_dtype], expected, value_dtype)
    if value_dtype == "int8":
        scale_key = SCALE_KEYS[key]
        scales = _checked_numpy(rec[scale_key], scale_key, np.dtype(np.float32), num_blocks(expected),
                                f"one scale per {INT8_BLOCK} values")
        if not (np.isfinite(scales).all() and (scales > 0).all() and (scales <= _MAX_SCALE).all()):
            raise ReplyError(f"'{scale_key}' holds a scale that is not finite, not > 0 or above {_MAX_SCALE:.4g}")
        if (wire == -128).any():
            raise ReplyError(f"'{key}' holds the int8 code -128, outside the symmetric range [-127, 127]")
        t = dequantize_int8(Int8Blocks(wire, scales))
    else:
        t = from_wire(wire, value_dtype)
    if not bool(torch.isfinite(t).all()):
        raise ReplyError(f"'{key}' contains NaN or Inf")
    return t


def read_payload(rec: ArrayRecord, layout: Layout, masks: Masks | None,
                 value_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, dense) float32 tensors from a payload, after checking keys, dtypes, shapes, lengths, int8 scales
    and finiteness."""
    keys = payload_keys(value_dtype)
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ReplyError(f"payload lacks {', '.join(missing)}")
    extra = [k for k in rec if k not in keys]
    if extra:
        raise ReplyError(f"payload has unexpected arrays {', '.join(extra)}")
    n_values, n_dense = num_values(layout, masks)
    return _decode(rec, "values", n_values, value_dtype), _decode(rec, "dense", n_dense, value_dtype)


def content_bytes(content: RecordDict) -> int:
    """Serialized payload bytes of a message's content: Flower's count_bytes() of each record."""
    return sum(rec.count_bytes() for rec in content.values())


def logical_payload_bytes(layout: Layout, masks: Masks | None, value_dtype: str) -> int:
    """Values x bytes per value, plus int8's float32 scales, without any header."""
    counts = num_values(layout, masks)
    scale_bytes = 4 * sum(num_blocks(n) for n in counts) if value_dtype == "int8" else 0
    return sum(counts) * VALUE_BYTES[value_dtype] + scale_bytes


# ---- top-k replies: one Array holding raw codec bytes

TOPK_KEY = "update"  # the one Array of a top-k reply (`fedsparse.topk.encode_topk_update` bytes)
TOPK_STYPE = "fedsparse.codec"  # its Array.stype: raw codec bytes, no npy header
TOPK_RESIDUAL = "topk-residual"  # the ArrayRecord in the node state that carries what was not sent yet


def topk_arrays(buf: bytes) -> ArrayRecord:
    """The reply's ArrayRecord: one Array whose data is the codec buffer itself (count_bytes = len + key)."""
    return ArrayRecord({TOPK_KEY: Array(dtype="uint8", shape=(len(buf),), stype=TOPK_STYPE, data=buf)})
