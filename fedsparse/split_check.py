"""Can a Dirichlet split be drawn, and what would work when it cannot: computed, in well under a second per try.

flwr-datasets' `DirichletPartitioner` (what `partitioner=dirichlet` uses: `min_partition_size=2`, self-balancing)
redraws up to 11 times until every client holds at least 2 examples, then raises a ValueError that names no key;
at 10,000 clients over Fashion-MNIST that takes over a minute. `dirichlet_sizes` replays the same draw on counts
only (the same generator, seeded the same, the same Dirichlet draws per class in the same order, the same
self-balancing, normalisation and integer split points, computed with the same floating-point operations in the
same order), so it gives the exact client sizes flwr-datasets would, or None exactly when flwr-datasets would give
up (tests/test_split_check.py compares the two). `dirichlet_advice` then searches what would work: the largest
num-clients at this alpha, the smallest alpha (doubling) at this num-clients, each checked with the same replay.

Invariant: every value `dirichlet_advice` names was checked to split; nothing is suggested by a rule of thumb.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_PARTITION_SIZE = 2  # fedsparse.data.make_partitioner's DirichletPartitioner(min_partition_size=2)
ATTEMPTS = 11  # flwr-datasets draws again after each failure and raises when the 11th draw fails too
MAX_ALPHA = 1000.0  # the alpha search stops there


def dirichlet_sizes(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                    min_size: int = MIN_PARTITION_SIZE) -> np.ndarray | None:
    """The example count of every client flwr-datasets' self-balancing DirichletPartitioner(num_clients, alpha,
    min_size, seed) would draw over `labels`, or None when it would raise (every one of its 11 draws left a client
    with fewer than `min_size` examples)."""
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"num_clients must be >= 1 and alpha > 0, got {num_clients}, {alpha}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed=seed)
    alphas = np.array([float(alpha)], dtype=float).repeat(num_clients)
    average = len(labels) / num_clients
    class_counts = [int(np.count_nonzero(labels == k)) for k in sorted(np.unique(labels).tolist())]
    for _ in range(ATTEMPTS):
        sizes = np.zeros(num_clients, dtype=np.int64)
        for count in class_counts:
            proportions = rng.dirichlet(alphas)
            proportions[sizes > average] = 0.0  # a client above the average gets no more examples
            total = sum(proportions.tolist())  # a sequential sum, as flwr-datasets' sum() over a dict
            proportions = proportions / total
            bounds = (np.cumsum(proportions.tolist()) * count).astype(int)[:-1]
            edges = np.concatenate(([0], np.clip(bounds, 0, count), [count]))
            sizes += np.diff(np.maximum.accumulate(edges))
        if sizes.min() >= min_size:
            return sizes
    return None


@dataclass(frozen=True)
class SplitAdvice:
    """What would split `num_examples` with `partitioner=dirichlet` (each checked): the largest number of clients
    at the asked alpha (None: not even 2), and the smallest alpha found by doubling at the asked number of clients
    (None: none up to MAX_ALPHA)."""

    num_examples: int
    max_clients: int | None
    min_alpha: float | None

    def text(self) -> str:
        """One sentence naming the keys and the values that work."""
        options = []
        if self.max_clients is not None:
            options.append(f"num-clients={self.max_clients} (the most that split at this dirichlet-alpha)")
        if self.min_alpha is not None:
            options.append(f"dirichlet-alpha={self.min_alpha:g} (the smallest of alpha x 2, x 4, ... that splits)")
        else:
            options.append(f"no dirichlet-alpha up to {MAX_ALPHA:g} splits this many clients")
        options.append("partitioner=dirichlet-balanced or iid (every client gets num_examples / num-clients)")
        return ("each client needs at least 2 examples; what splits (checked): " + "; ".join(options))


def dirichlet_advice(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> SplitAdvice:
    """Search the values that split (module docstring): binary search on num-clients below `num_clients` (the
    answer is checked, and the search assumes fewer clients split more easily), doubling alpha."""
    low, high = 1, num_clients  # low splits (one client holds everything), high does not
    while high - low > 1:
        middle = (low + high) // 2
        if dirichlet_sizes(labels, middle, alpha, seed) is not None:
            low = middle
        else:
            high = middle
    max_clients = low if low >= 2 and dirichlet_sizes(labels, low, alpha, seed) is not None else None
    min_alpha = None
    candidate = alpha * 2
    while candidate <= MAX_ALPHA:
        if dirichlet_sizes(labels, num_clients, candidate, seed) is not None:
            min_alpha = candidate
            break
        candidate *= 2
    return SplitAdvice(len(labels), max_clients, min_alpha)
