"""Fixed sparsity masks: how they are chosen (saliency, random, magnitude), packed, fingerprinted, and how a
model's weights are laid out as one vector of masked values plus one vector of dense tensors.

A mask is a dict {state-dict key: bool tensor} over the maskable weights. "Mask order" is state-dict order, then
row-major order inside each tensor: both sides derive it from the model alone, so no index ever travels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

Masks = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


NO_MASK = "dense"  # the fingerprint of "no mask" (Flower cannot count an empty string in a ConfigRecord)
# Text in a client's error when it holds no mask matching the server's: the server then re-installs the mask.
MASK_MISSING = "no installed mask matches"


class MaskError(ValueError):
    """A mask that cannot be built as asked (e.g. it would leave a layer with no weight)."""


@dataclass(frozen=True)
class Layout:
    """Which state-dict entries are maskable and which always travel dense, with their shapes."""

    maskable: tuple[str, ...]
    dense: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, state: State, maskable: list[str]) -> Layout:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        return cls(tuple(maskable), tuple(k for k in state if k not in maskable), shapes)

    def numel(self, names: tuple[str, ...]) -> int:
        return int(sum(np.prod(self.shapes[k], dtype=np.int64) for k in names))

    @property
    def num_maskable(self) -> int:
        return self.numel(self.maskable)

    @property
    def num_dense(self) -> int:
        return self.numel(self.dense)


def flatten(tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    if not names:
        return torch.zeros(0)
    return torch.cat([tensors[k].reshape(-1).float() for k in names])


def split_flat(flat: torch.Tensor, layout: Layout, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for k in names:
        n = int(np.prod(layout.shapes[k], dtype=np.int64))
        out[k] = flat[start:start + n].reshape(layout.shapes[k])
        start += n
    return out


def topk_mask(scores: dict[str, torch.Tensor], density: float, scope: str = "global") -> Masks:
    """Keep exactly round(density * n) entries with the highest scores (globally, or per tensor with
    scope="layerwise"). Ties are broken by position (earlier wins), so the result is deterministic."""
    names = tuple(scores)
    if scope == "layerwise":
        masks = {k: topk_mask({k: s}, density)[k] for k, s in scores.items()}
    else:
        flat = flatten(scores, names).numpy()
        k = round(density * flat.size)
        keep = np.zeros(flat.size, dtype=bool)
        keep[np.argsort(-flat, kind="stable")[:k]] = True
        layout = Layout(names, (), {n: tuple(s.shape) for n, s in scores.items()})
        masks = split_flat(torch.from_numpy(keep), layout, names)
    empty = [k for k, m in masks.items() if not bool(m.any())]
    if empty:
        raise MaskError(f"density {density:g} leaves no weight in {', '.join(empty)}; lower the sparsity "
                        "or use mask-scope=layerwise")
    return masks


def check_density(layout: Layout, density: float, scope: str) -> None:
    """Fail early when no mask of this density can keep a weight in every maskable tensor."""
    if scope == "layerwise":
        empty = [k for k in layout.maskable if round(density * layout.numel((k,))) < 1]
    else:
        empty = list(layout.maskable) if round(density * layout.num_maskable) < len(layout.maskable) else []
    if empty:
        raise MaskError(f"density {density:g} cannot keep a weight in every maskable tensor (e.g. {empty[0]}); "
                        "lower the sparsity")


def random_mask(shapes: dict[str, tuple[int, ...]], density: float, seed: int, scope: str = "global") -> Masks:
    """A seeded random mask of exactly the requested density: top-k over i.i.d. uniform scores."""
    gen = torch.Generator().manual_seed(seed)
    scores = {k: torch.rand(shape, generator=gen) for k, shape in shapes.items()}
    return topk_mask(scores, density, scope)


def magnitude_mask(state: State, names: tuple[str, ...], density: float, scope: str = "global") -> Masks:
    """Keep the largest-magnitude weights (a PruneFL-like one-shot mask from the server's model)."""
    return topk_mask({k: state[k].abs().float() for k in names}, density, scope)


def density_of(masks: Masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def pack_mask(masks: Masks, layout: Layout) -> np.ndarray:
    """The mask as a bitmap, 1 bit per maskable weight in mask order (uint8, np.packbits)."""
    return np.packbits(flatten({k: m.float() for k, m in masks.items()}, layout.maskable).numpy().astype(bool))


def unpack_mask(bits: np.ndarray, layout: Layout) -> Masks:
    n = layout.num_maskable
    if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != (n + 7) // 8:
        raise MaskError(f"mask bitmap must be {(n + 7) // 8} uint8 bytes for {n} weights, got "
                        f"{bits.size} {bits.dtype}")
    flat = torch.from_numpy(np.unpackbits(bits)[:n].astype(bool))
    return split_flat(flat, layout, layout.maskable)


def fingerprint(bits: np.ndarray) -> str:
    """A short hash of the packed mask: replies tagged with another fingerprint trained on another mask."""
    return hashlib.sha256(np.ascontiguousarray(bits).tobytes()).hexdigest()[:16]


def state_fingerprint(state: State) -> str:
    """A short hash of a whole state dict (names, dtypes, shapes and bytes, in name order): two processes that
    built the same model from the same seed get the same fingerprint, any other difference a different one."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def gather(state: State, layout: Layout, masks: Masks | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked values in mask order, dense tensors concatenated). Without masks every tensor is dense."""
    if masks is None:
        return torch.zeros(0), flatten(state, layout.maskable + layout.dense)
    values = torch.cat([state[k].reshape(-1)[masks[k].reshape(-1)].float() for k in layout.maskable])
    return values, flatten(state, layout.dense)


def scatter(values: torch.Tensor, dense: torch.Tensor, layout: Layout, masks: Masks | None) -> State:
    """Inverse of `gather`: a full state dict, zeros off the mask."""
    if masks is None:
        return split_flat(dense, layout, layout.maskable + layout.dense)
    out, start = {}, 0
    for k in layout.maskable:
        m = masks[k].reshape(-1)
        t = torch.zeros(m.numel())
        n = int(m.sum())
        t[m] = values[start:start + n]
        out[k] = t.reshape(layout.shapes[k])
        start += n
    out.update(split_flat(dense, layout, layout.dense))
    return out


def num_values(layout: Layout, masks: Masks | None) -> tuple[int, int]:
    """(number of masked values, number of dense values) that one model payload carries."""
    if masks is None:
        return 0, layout.num_maskable + layout.num_dense
    return sum(int(m.sum()) for m in masks.values()), layout.num_dense


def weighted_mean(parts: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """Weighted mean of vectors, summed in float64 in the given order (callers sort it: reproducible floats)."""
    total = sum(w for w, _ in parts)
    out = torch.zeros_like(parts[0][1], dtype=torch.float64)
    for w, v in parts:
        out += (w / total) * v.double()
    return out.float()


def coordinate_median(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Per-coordinate median of equally long vectors (for an even count, the mean of the two middle values),
    computed in float64. Unweighted, as Flower's FedMedian: a robust aggregate ignores the claimed example counts."""
    if not vectors:
        raise ValueError("coordinate_median needs at least one vector")
    stacked, _ = torch.sort(torch.stack([v.double() for v in vectors]), dim=0)
    n = len(vectors)
    if n % 2:
        return stacked[n // 2].float()
    return ((stacked[n // 2 - 1] + stacked[n // 2]) / 2).float()


def trimmed_mean(vectors: list[torch.Tensor], trim_fraction: float) -> torch.Tensor:
    """Per-coordinate mean after dropping the floor(trim_fraction x n) smallest and as many largest values
    (unweighted, as Flower's FedTrimmedAvg), computed in float64."""
    if not vectors:
        raise ValueError("trimmed_mean needs at least one vector")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = len(vectors)
    cut = int(trim_fraction * n)
    stacked, _ = torch.sort(torch.stack([v.double() for v in vectors]), dim=0)
    return stacked[cut:n - cut].mean(dim=0).float()
