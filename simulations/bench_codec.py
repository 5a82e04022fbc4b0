"""Benchmark the sparse codec on a ResNet-18-sized tensor with random masks.

For each density and value format: index bits per kept entry (Rice and the layout the encoder picked) against
the entropy bound, total bytes against FedLab's int64-index top-k encoding, and single-core encode/decode
seconds (best of a few runs). Prints a markdown table and writes the rows as JSON to --out.

    python simulations/bench_codec.py [--out results/bench_codec.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from fedsparse.codec import (
    VALUE_FORMATS,
    decode,
    encode,
    entropy_bound_bits,
    fedlab_topk_bytes,
    read_header,
    rice_index_bits,
)

N = 11_173_962  # parameters in ResNet-18 (CIFAR variant)
DENSITIES = (0.01, 0.1, 0.5)
COLUMNS = {
    "density": "density",
    "format": "format",
    "kept": "kept",
    "layout": "layout",
    "index_bits_per_kept": "index bits/kept",
    "rice_bits_per_kept": "rice bits/kept",
    "entropy_bits_per_kept": "entropy bits/kept",
    "rice_over_entropy": "rice/entropy",
    "bytes": "bytes",
    "fedlab_bytes": "FedLab bytes",
    "fedlab_over_ours": "FedLab/ours",
    "encode_s": "encode s",
    "decode_s": "decode s",
}


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest of `repeats` runs, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def random_update(n: int, density: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A float32 vector whose kept entries are a Bernoulli(density) mask; returns (x, kept indices)."""
    idx = np.flatnonzero(rng.random(n) < density)
    x = np.zeros(n, dtype=np.float32)
    x[idx] = rng.standard_normal(idx.size).astype(np.float32)
    return x, idx


def index_bits(buf: bytes, n: int) -> int:
    """Index-stream bits of the layout the encoder chose (padding and header excluded)."""
    h = read_header(buf, max_elements=n)
    return {"dense": 0, "bitmap": n, "rice": h.unary_bits + h.kept * h.rice_k}[h.layout]


def bench_row(x: np.ndarray, idx: np.ndarray, density: float, fmt: str, repeats: int) -> dict:
    n, kept = x.size, idx.size
    rng = np.random.default_rng(0)
    options = {"stochastic_rounding": True, "rng": rng} if fmt == "int8" else {}
    encode_s, buf = best_time(lambda: encode(x, fmt, **options), repeats)
    decode_s, y = best_time(lambda: decode(buf, max_elements=n), repeats)
    if fmt == "float32":  # the benchmark also checks the round trip it times
        assert np.array_equal(x, y)
    entropy = entropy_bound_bits(n, kept)
    rice = rice_index_bits(idx, n)
    return {
        "density": density,
        "format": fmt,
        "kept": kept,
        "layout": read_header(buf, max_elements=n).layout,
        "index_bits_per_kept": index_bits(buf, n) / kept,
        "rice_bits_per_kept": rice / kept,
        "entropy_bits_per_kept": entropy / kept,
        "rice_over_entropy": rice / entropy,
        "bytes": len(buf),
        "fedlab_bytes": fedlab_topk_bytes(kept),
        "fedlab_over_ours": fedlab_topk_bytes(kept) / len(buf),
        "encode_s": encode_s,
        "decode_s": decode_s,
    }


def markdown(rows: list[dict]) -> str:
    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[key]) for key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_codec.json"))
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rows = []
    with threadpool_limits(limits=1):  # one core: numpy's element-wise code is single-threaded already
        for density in DENSITIES:
            x, idx = random_update(args.n, density, rng)
            rows += [bench_row(x, idx, density, fmt, args.repeats) for fmt in VALUE_FORMATS]

    print(markdown(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "n": args.n,
        "seed": args.seed,
        "repeats": args.repeats,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
