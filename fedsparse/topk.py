"""Top-k compression of model updates with error feedback.

Each round a client adds its carried residual to the fresh update, sends the k largest-magnitude entries of
that sum and carries the rest forward. Nothing is lost, only delayed: over any number of rounds

    sum of sent values + final residual == sum of updates (+ initial residual)

up to float rounding of the additions.
"""

from __future__ import annotations

from numbers import Real

import numpy as np

from fedsparse import codec


def topk_indices(x: np.ndarray, density: float) -> np.ndarray:
    """Sorted flat int64 indices of the k = max(1, round(density * size)) largest |x|.

    Ties at the threshold go to the lowest flat indices, so the choice is deterministic.
    """
    _check_density(density)
    mag = np.abs(np.asarray(x).reshape(-1))
    if not np.all(np.isfinite(mag)):
        raise ValueError("top-k needs finite values")
    n = mag.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n, max(1, round(density * n)))
    threshold = np.partition(mag, n - k)[n - k]  # the k-th largest magnitude
    above = np.flatnonzero(mag > threshold)
    at = np.flatnonzero(mag == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, at])).astype(np.int64)  # disjoint sets: no union1d (10x slower)


def compress(
    update: np.ndarray, residual: np.ndarray | None, density: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One error-feedback step: (sent flat indices, sent values, new residual).

    corrected = update + residual; the top-k of corrected is sent and zeroed out of it to give the new
    residual, so sent values + new residual == corrected exactly.
    """
    update = np.asarray(update)
    if not np.issubdtype(update.dtype, np.floating):
        raise ValueError(f"update must be a float array, got {update.dtype}")
    if residual is None:
        corrected = update.copy()
    else:
        residual = np.asarray(residual)
        if residual.shape != update.shape:
            raise ValueError(f"residual shape {residual.shape} != update shape {update.shape}")
        corrected = update + residual
    idx = topk_indices(corrected, density)
    flat = corrected.reshape(-1)  # a view: zeroing it edits corrected in place
    values = flat[idx].copy()
    flat[idx] = 0
    return idx, values, corrected


def _check_density(density: float) -> None:
    # bool is a Real too, but True as a density is a bug, not 100%; NaN fails the range check
    valid = isinstance(density, Real) and not isinstance(density, bool) and 0 < density <= 1
    if not valid:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")


def encode_topk_update(update: np.ndarray, residual: np.ndarray | None, density: float, value_dtype: str
                       ) -> tuple[bytes, np.ndarray]:
    """(codec bytes of the top-k of update + residual, new residual).

    The new residual also takes the rounding error of the sent values (value_dtype), so that decoded sent
    values + new residual == update + residual: nothing is lost, only sent later.
    """
    idx, vals, residual = compress(update.astype(np.float32, copy=False), residual, density)
    buf = codec.encode_sparse(update.size, idx, vals, value_dtype)
    _, sent_idx, sent_vals = codec.decode_sparse(buf, max_elements=update.size)  # what the server will see
    sent = np.zeros(update.size, dtype=np.float32)
    sent[sent_idx] = sent_vals
    residual[idx] += vals - sent[idx]  # (a dense-layout buffer also carries zeros off idx: they change nothing)
    return buf, residual
