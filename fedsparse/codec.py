"""Self-describing sparse tensor codec.

A tensor travels as its kept entries (indices + values). Per tensor the encoder picks the cheapest of three
index layouts, computing each size exactly first:

- ``dense``:  every entry is sent, no index stream (the kept set becomes the whole tensor);
- ``bitmap``: one bit per entry, packed MSB first;
- ``rice``:   Golomb-Rice code of the gaps between kept indices.

Gaps: ``v[0] = idx[0]`` and ``v[i] = idx[i] - idx[i-1] - 1``, i.e. the number of skipped entries before each
kept one (the gap from a virtual index -1). Each ``v`` is split into ``q = v >> k`` and ``r = v & (2**k - 1)``.
The quotients form a unary stream (q ones, then a zero) and the remainders a stream of fixed k-bit fields, so
both directions vectorise.

Wire format, little endian::

    b"FS" | version u8 | layout u8 | value format u8 | ndim u8 | shape ndim*u64 | kept u64 | rice k u8
    [int8]  scale f32
    [rice]  unary stream length in bits u64
    payload: unary stream | remainder stream (rice) or bitmap (bitmap) | values

Streams are padded with zero bits to whole bytes. Every length follows from the header, so a buffer of the
wrong length is rejected before any payload is read, and the element count is checked against the caller's
``max_elements`` before anything is allocated.

Allocation bound: nothing a decoder allocates may grow faster than the buffer it was given, whatever
``max_elements`` the caller passes. ``read_header`` and ``decode_sparse`` allocate at most a fixed multiple of
``len(buf)`` (every index or value they build was paid for by bits in the buffer: a bitmap holds 8 entries a
byte, a Rice stream at least one bit per code). ``decode`` must also build the dense tensor, and a Rice buffer
declares the zeros after its last kept entry for free (a 31-byte header can declare 2**47 of them), so ``decode``
refuses a tensor of more than ``dense_output_limit(len(buf))`` elements: 2**16 per buffer byte (a 31-byte header
decodes to at most 2,031,616 zeros, 8 MiB). ``decode_sparse`` decodes sparser buffers without building the zeros.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAGIC = b"FS"
VERSION = 1
LAYOUTS = ("dense", "bitmap", "rice")
VALUE_FORMATS = ("float32", "float16", "bfloat16", "int8")
WIRE_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
}  # the numpy dtype each value format travels as: the one table, transport's payloads use it too
VALUE_BYTES = {value_format: dtype.itemsize for value_format, dtype in WIRE_DTYPES.items()}
_MAX_NDIM = 32
_MAX_DIM_PRODUCT = 2**48
_F32_MAX = float(np.finfo(np.float32).max)
_MAX_SCALE = _F32_MAX / 127  # larger, and 127 * scale overflows float32
_FIXED = "<2sBBBB"  # magic, version, layout, value format, ndim
_RICE_LEN_BYTES = 8  # the u64 unary length, only in rice headers
DENSE_OUTPUT_PER_BYTE = 2**16  # decode() builds at most this many elements per byte of buffer


class CodecError(ValueError):
    """A buffer that is not a valid encoding; the message says why."""


@dataclass(frozen=True)
class Header:
    """What a buffer declares about itself, already checked against its length."""

    layout: str
    value_format: str
    shape: tuple[int, ...]
    kept: int
    rice_k: int
    scale: float | None
    unary_bits: int
    header_bytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ----------------------------------------------------------------------------------------------- size helpers


def entropy_bound_bits(n: int, k: int) -> float:
    """n * H(k/n): bits needed to name which k of n entries are kept."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k in (0, n):
        return 0.0
    p = k / n
    return n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def rice_index_bits(indices: np.ndarray, n: int) -> int:
    """Exact bits of the Rice index stream (unary + remainders, no header, no byte padding)."""
    idx = _check_indices(indices, n)
    gaps = _gaps(idx)
    k = _best_rice_k(gaps, n)
    return _rice_bits(gaps, k)


def fedlab_topk_bytes(k: int) -> int:
    """Bytes FedLab's TopkCompressor sends for k kept entries: an int64 index and a float32 value each."""
    return 12 * k


# --------------------------------------------------------------------------------------------------- encode


def encode(
    x: np.ndarray,
    value_format: str = "float32",
    *,
    stochastic_rounding: bool = False,
    rng: np.random.Generator | None = None,
) -> bytes:
    """Encode a float array; its non-zero entries are the kept ones."""
    x = np.asarray(x)
    _check_real(x.dtype, "x")
    flat = x.reshape(-1)
    idx = np.flatnonzero(flat)
    return encode_sparse(
        x.shape, idx, flat[idx], value_format, stochastic_rounding=stochastic_rounding, rng=rng
    )


def encode_sparse(
    shape: int | Sequence[int],
    indices: np.ndarray,
    values: np.ndarray,
    value_format: str = "float32",
    *,
    stochastic_rounding: bool = False,
    rng: np.random.Generator | None = None,
) -> bytes:
    """Encode kept entries (sorted unique flat indices, values) of a tensor of the given shape.

    Kept values that are zero are kept too (except in the dense layout, which keeps everything).
    """
    shape = _check_shape(shape)
    n = math.prod(shape)
    idx = _check_indices(indices, n)
    vals = np.asarray(values)
    _check_real(vals.dtype, "values")
    if vals.shape != idx.shape:
        raise ValueError(f"values has shape {vals.shape}, indices has shape {idx.shape}")
    if value_format not in VALUE_FORMATS:
        raise ValueError(f"unknown value format {value_format!r}; expected one of {VALUE_FORMATS}")
    if stochastic_rounding and value_format != "int8":
        raise ValueError("stochastic rounding applies to the int8 format only")

    itemsize = WIRE_DTYPES[value_format].itemsize
    gaps = _gaps(idx)
    rice_k = _best_rice_k(gaps, n)
    unary_bits = idx.size + int(np.sum(gaps >> rice_k))
    sizes = _layout_sizes(n, idx.size, itemsize, unary_bits, rice_k)
    layout = min(LAYOUTS, key=sizes.__getitem__)  # ties go to the simpler layout (LAYOUTS order)

    if layout == "dense":
        full = np.zeros(n, dtype=vals.dtype)
        full[idx] = vals
        vals = full
    wire, scale = _quantize(vals, value_format, stochastic_rounding, rng)

    parts = [_pack_header(layout, value_format, shape, vals.size, rice_k if layout == "rice" else 0, scale)]
    if layout == "bitmap":
        bits = np.zeros(n, dtype=np.uint8)
        bits[idx] = 1
        parts.append(np.packbits(bits).tobytes())
    elif layout == "rice":
        parts.append(struct.pack("<Q", unary_bits))
        parts.append(_unary_encode(gaps >> rice_k, unary_bits))
        parts.append(_pack_fixed(gaps & ((1 << rice_k) - 1), rice_k))
    parts.append(wire.tobytes())
    return b"".join(parts)


def _layout_sizes(n: int, kept: int, itemsize: int, unary_bits: int, rice_k: int) -> dict[str, int]:
    """Payload bytes of each layout, plus the header bytes that differ between layouts."""
    return {
        "dense": n * itemsize,
        "bitmap": _nbytes(n) + kept * itemsize,
        "rice": _RICE_LEN_BYTES + _nbytes(unary_bits) + _nbytes(kept * rice_k) + kept * itemsize,
    }


def _pack_header(
    layout: str, value_format: str, shape: tuple[int, ...], kept: int, rice_k: int, scale: float | None
) -> bytes:
    head = struct.pack(
        _FIXED, MAGIC, VERSION, LAYOUTS.index(layout), VALUE_FORMATS.index(value_format), len(shape)
    )
    head += struct.pack(f"<{len(shape)}QQB", *shape, kept, rice_k)
    if scale is not None:
        head += struct.pack("<f", scale)
    return head


def _gaps(idx: np.ndarray) -> np.ndarray:
    """Skipped entries before each kept index (first one counted from a virtual index -1)."""
    return np.diff(idx, prepend=-1) - 1


def _rice_bits(gaps: np.ndarray, k: int) -> int:
    return gaps.size * (k + 1) + int(np.sum(gaps >> k))


def _best_rice_k(gaps: np.ndarray, n: int) -> int:
    """The k with the fewest coded bits.

    The cost kept*(k+1) + sum(gaps >> k) is convex in k (each extra bit of k saves at most as much as the
    previous one did), so walking downhill from a guess near log2(mean gap) finds the exact optimum.
    """
    k_max = max(0, n.bit_length() - 1)  # keeps 2**k <= n, which decode relies on
    if gaps.size == 0:
        return 0
    mean = float(np.mean(gaps))
    k = min(k_max, max(0, round(math.log2(mean)))) if mean >= 1 else 0
    cost = _rice_bits(gaps, k)
    for step in (-1, 1):
        while 0 <= k + step <= k_max:
            trial = _rice_bits(gaps, k + step)
            if trial >= cost:
                break
            k, cost = k + step, trial
    return k


def _unary_encode(quotients: np.ndarray, nbits: int) -> bytes:
    """q ones then a zero per quotient, packed MSB first."""
    bits = np.ones(nbits, dtype=np.uint8)
    bits[np.cumsum(quotients + 1) - 1] = 0  # where each quotient's terminating zero lands
    return np.packbits(bits).tobytes()


def _pack_fixed(fields: np.ndarray, k: int) -> bytes:
    """Pack non-negative integers < 2**k as consecutive k-bit fields, MSB first."""
    if k == 0 or fields.size == 0:
        return b""
    width = (k + 7) // 8
    as_bytes = fields.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - width :]
    bits = np.unpackbits(as_bytes, axis=1)[:, 8 * width - k :]
    return np.packbits(bits.reshape(-1)).tobytes()


def _quantize(
    vals: np.ndarray, value_format: str, stochastic: bool, rng: np.random.Generator | None
) -> tuple[np.ndarray, float | None]:
    """Values as the wire array, plus the int8 scale (None for float formats)."""
    if value_format == "int8":
        return _quantize_int8(vals, stochastic, rng)
    with np.errstate(over="ignore"):  # overflow is reported below, with a better message
        if value_format == "float16":
            wire = vals.astype(np.float16)
        else:
            wire = vals.astype(np.float32, copy=False)
            if value_format == "bfloat16":
                wire = bfloat16_bits(wire)
    decoded = _dequantize(wire, value_format, None)
    if np.any(np.isinf(decoded) & np.isfinite(vals)):
        hint = "" if value_format == "float32" else "; use float32"
        raise ValueError(f"finite values overflow {value_format}{hint}")
    return wire.astype(WIRE_DTYPES[value_format], copy=False), None


def _quantize_int8(
    vals: np.ndarray, stochastic: bool, rng: np.random.Generator | None
) -> tuple[np.ndarray, float]:
    v = vals.astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("int8 format needs finite values")
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    if peak > _F32_MAX:
        raise ValueError(f"int8 values up to {peak:.4g} do not fit float32")
    scale = np.float32(peak / 127)
    if float(scale) > _MAX_SCALE:  # rounded up past the largest scale whose 127 * scale stays finite
        scale = np.nextafter(scale, np.float32(0))
    if scale == 0 and peak > 0:  # peak/127 underflowed float32: the smallest subnormal still works
        scale = np.nextafter(np.float32(0), np.float32(1))
    if scale == 0:
        return np.zeros(v.size, dtype=np.int8), 0.0
    ratio = v / np.float64(scale)
    if stochastic:
        rng = rng if rng is not None else np.random.default_rng()
        q = np.floor(ratio + rng.random(ratio.size))  # rounds up with probability frac(ratio): unbiased
    else:
        q = np.rint(ratio)
    return np.clip(q, -127, 127).astype(np.int8), float(scale)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 raw words (uint16), round to nearest even; NaN stays NaN.

    The one float32 -> bfloat16 conversion of the project (transport's payloads use it too); it equals torch's
    `.to(torch.bfloat16)` bit for bit on every non-NaN value.
    """
    x32 = np.asarray(x, dtype=np.float32)
    u = x32.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept bits exactly when the dropped half is
    # above one half, or exactly one half with an odd kept part: round half to even.
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    nan = np.isnan(x32)
    if np.any(nan):  # rounding could carry a NaN's payload into infinity; keep it a quiet NaN instead
        rounded[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


# --------------------------------------------------------------------------------------------------- decode


def read_header(buf: bytes, *, max_elements: int) -> Header:
    """Parse and check a buffer's header against its length and max_elements, without decoding."""
    _check_max_elements(max_elements)
    view = memoryview(buf).cast("B")
    reader = _Reader(view)
    magic, version, layout_code, format_code, ndim = reader.take(_FIXED)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"unsupported version {version}, expected {VERSION}")
    if layout_code >= len(LAYOUTS):
        raise CodecError(f"unknown layout code {layout_code}")
    if format_code >= len(VALUE_FORMATS):
        raise CodecError(f"unknown value format code {format_code}")
    if ndim > _MAX_NDIM:
        raise CodecError(f"ndim {ndim} exceeds {_MAX_NDIM}")
    layout, value_format = LAYOUTS[layout_code], VALUE_FORMATS[format_code]

    shape = reader.take(f"<{ndim}Q")
    _check_size(shape, max_elements)
    n = math.prod(shape)
    kept, rice_k = reader.take("<QB")
    scale = reader.take("<f")[0] if value_format == "int8" else None
    unary_bits = reader.take("<Q")[0] if layout == "rice" else 0
    _check_counts(layout, n, kept, rice_k, unary_bits)
    if scale is not None and not 0 <= scale <= _MAX_SCALE:  # also rejects NaN
        raise CodecError(f"int8 scale must be in [0, {_MAX_SCALE:.4g}], got {scale}")

    header = Header(layout, value_format, tuple(shape), kept, rice_k, scale, unary_bits, reader.pos)
    expected = reader.pos + _payload_bytes(header)
    if len(view) < expected:
        raise CodecError(f"truncated buffer: header declares {expected} bytes, got {len(view)}")
    if len(view) > expected:
        raise CodecError(f"{len(view) - expected} trailing bytes after the declared {expected}")
    return header


def dense_output_limit(buffer_bytes: int) -> int:
    """The most elements `decode` will allocate for a buffer of `buffer_bytes` bytes (see the module docstring)."""
    return DENSE_OUTPUT_PER_BYTE * buffer_bytes


def decode(buf: bytes, *, max_elements: int) -> np.ndarray:
    """Decode to a float32 array of the original shape; hostile input raises CodecError.

    The dense result is refused (CodecError) when it has more than `dense_output_limit(len(buf))` elements,
    whatever `max_elements` allows: use `decode_sparse` for buffers that sparse.
    """
    header = read_header(buf, max_elements=max_elements)
    size = len(memoryview(buf).cast("B"))
    limit = dense_output_limit(size)
    if header.numel > limit:
        raise CodecError(f"a {size}-byte buffer declares {header.numel} elements, more "
                         f"than the {limit} decode() allocates for it; decode_sparse() reads it without the zeros")
    idx, vals = _decode_parts(buf, header)
    if idx is None:
        return vals.reshape(header.shape)
    out = np.zeros(header.numel, dtype=np.float32)
    out[idx] = vals
    return out.reshape(header.shape)


def decode_sparse(buf: bytes, *, max_elements: int) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """Decode to (shape, sorted int64 flat indices, float32 values).

    A ``dense`` buffer sent every entry, so all indices come back.
    """
    header = read_header(buf, max_elements=max_elements)
    idx, vals = _decode_parts(buf, header)
    if idx is None:  # dense layout: numel == kept, paid for by the values in the buffer
        idx = np.arange(header.numel, dtype=np.int64)
    return header.shape, idx, vals


def _decode_parts(buf: bytes, header: Header) -> tuple[np.ndarray | None, np.ndarray]:
    """Indices (None for dense) and float32 values of a buffer whose header `read_header` has checked."""
    view = memoryview(buf).cast("B")
    pos = header.header_bytes
    idx = None
    if header.layout == "bitmap":
        nbytes = _nbytes(header.numel)
        idx = _bitmap_decode(view[pos : pos + nbytes], header.numel, header.kept)
        pos += nbytes
    elif header.layout == "rice":
        unary_len, rem_len = _nbytes(header.unary_bits), _nbytes(header.kept * header.rice_k)
        quotients = _unary_decode(view[pos : pos + unary_len], header.unary_bits, header.kept)
        remainders = _unpack_fixed(
            view[pos + unary_len : pos + unary_len + rem_len], header.kept, header.rice_k
        )
        idx = _indices_from_gaps((quotients << header.rice_k) | remainders, header.numel)
        pos += unary_len + rem_len
    wire = np.frombuffer(view, dtype=WIRE_DTYPES[header.value_format], count=header.kept, offset=pos)
    if header.value_format == "int8" and np.any(wire == -128):
        raise CodecError("int8 value -128 is outside the symmetric range [-127, 127]")
    return idx, _dequantize(wire, header.value_format, header.scale)


def bfloat16_to_float32(words: np.ndarray) -> np.ndarray:
    """bfloat16 raw words (uint16) -> float32, exactly (inverse of `bfloat16_bits` on every non-NaN value)."""
    return (np.asarray(words, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _dequantize(wire: np.ndarray, value_format: str, scale: float | None) -> np.ndarray:
    if value_format == "bfloat16":
        return bfloat16_to_float32(wire)
    if value_format == "int8":
        return wire.astype(np.float32) * np.float32(scale)
    return wire.astype(np.float32)


def _bitmap_decode(stream: memoryview, n: int, kept: int) -> np.ndarray:
    packed = np.frombuffer(stream, dtype=np.uint8)
    _check_padding(packed, n, "bitmap")
    idx = np.flatnonzero(np.unpackbits(packed, count=n))
    if idx.size != kept:
        raise CodecError(f"bitmap marks {idx.size} entries, header declares {kept}")
    return idx


def _unary_decode(stream: memoryview, nbits: int, kept: int) -> np.ndarray:
    packed = np.frombuffer(stream, dtype=np.uint8)
    _check_padding(packed, nbits, "unary stream")
    ends = np.flatnonzero(np.unpackbits(packed, count=nbits) == 0)
    if ends.size != kept:
        raise CodecError(f"unary stream holds {ends.size} codes, header declares {kept}")
    if kept and ends[-1] != nbits - 1:
        raise CodecError("unary stream has bits after its last code")
    return np.diff(ends, prepend=-1) - 1


def _unpack_fixed(stream: memoryview, count: int, k: int) -> np.ndarray:
    """Inverse of `_pack_fixed`: count k-bit fields as int64."""
    if k == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    packed = np.frombuffer(stream, dtype=np.uint8)
    _check_padding(packed, count * k, "remainder stream")
    bits = np.unpackbits(packed, count=count * k).reshape(count, k)
    width = (k + 7) // 8
    aligned = np.zeros((count, 8 * width), dtype=np.uint8)
    aligned[:, 8 * width - k :] = bits
    as_bytes = np.zeros((count, 8), dtype=np.uint8)
    as_bytes[:, 8 - width :] = np.packbits(aligned, axis=1)
    return as_bytes.view(">u8").reshape(-1).astype(np.int64)


def _indices_from_gaps(gaps: np.ndarray, n: int) -> np.ndarray:
    idx = np.cumsum(gaps + 1) - 1
    # Each gap is <= 2n (header checks), so a sum that wraps int64 must first pass through values >= n:
    # checking every index, not just the last, also rejects overflow.
    if idx.size and np.any(idx >= n):
        raise CodecError(f"rice stream decodes to an index >= {n}")
    return idx


class _Reader:
    """Sequential struct reads that fail with CodecError on truncation."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.view):
            raise CodecError(f"truncated header: need {self.pos + size} bytes, got {len(self.view)}")
        out = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += size
        return out


def _payload_bytes(h: Header) -> int:
    itemsize = WIRE_DTYPES[h.value_format].itemsize
    index_bytes = {
        "dense": 0,
        "bitmap": _nbytes(h.numel),
        "rice": _nbytes(h.unary_bits) + _nbytes(h.kept * h.rice_k),
    }[h.layout]
    return index_bytes + h.kept * itemsize


def _check_size(shape: tuple[int, ...], max_elements: int) -> None:
    if math.prod(shape) > max_elements:
        raise CodecError(f"shape {shape} has more than max_elements={max_elements} elements")
    # An empty tensor allocates nothing, but numpy still refuses shapes whose non-zero dimensions multiply
    # past its address space, so bound that product too.
    if math.prod(d for d in shape if d) > _MAX_DIM_PRODUCT:
        raise CodecError(f"shape {shape} has dimensions too large for any array")


def _check_counts(layout: str, n: int, kept: int, rice_k: int, unary_bits: int) -> None:
    if kept > n:
        raise CodecError(f"{kept} kept entries in a tensor of {n}")
    if layout == "dense" and kept != n:
        raise CodecError(f"dense layout must keep all {n} entries, header declares {kept}")
    if layout != "rice":
        if rice_k:
            raise CodecError(f"rice k={rice_k} in a {layout} header")
        return
    if rice_k > max(0, n.bit_length() - 1):
        raise CodecError(f"rice k={rice_k} too large for {n} entries")
    ones = unary_bits - kept  # the quotients' sum
    # The gaps sum to last index + 1 - kept <= n - kept, and each gap is at least its quotient << k.
    if ones < 0 or (ones << rice_k) > n - kept or (kept == 0 and unary_bits):
        raise CodecError(f"unary stream of {unary_bits} bits is inconsistent with {kept} of {n} kept")


def _check_padding(packed: np.ndarray, nbits: int, what: str) -> None:
    spare = 8 * packed.size - nbits
    if spare and packed[-1] & ((1 << spare) - 1):
        raise CodecError(f"non-zero padding bits in the {what}")


# --------------------------------------------------------------------------------------- argument checking


def _check_max_elements(max_elements: int) -> None:
    if isinstance(max_elements, bool) or not isinstance(max_elements, (int, np.integer)) or max_elements < 0:
        raise ValueError(f"max_elements must be a non-negative int, got {max_elements!r}")


def _check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if len(dims) > _MAX_NDIM:
        raise ValueError(f"ndim {len(dims)} exceeds {_MAX_NDIM}")
    if any(int(d) < 0 for d in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    return tuple(int(d) for d in dims)


def _check_indices(indices: np.ndarray, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} with shape {idx.shape}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx[0] < 0 or idx[-1] >= n or np.any(np.diff(idx) <= 0)):
        raise ValueError(f"indices must be strictly increasing and in [0, {n})")
    return idx


def _check_real(dtype: np.dtype, name: str) -> None:
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise ValueError(f"{name} must be real-valued, got dtype {dtype}")


def _nbytes(nbits: int) -> int:
    return (nbits + 7) // 8
