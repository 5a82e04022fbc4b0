"""Model merging as the aggregation of ordinary federated rounds: strategies `ties` and `dare`.

Each round is FedAvg's round (same sampling, messages, reply validation, norm screening and bytes); only the step
that turns the accepted updates into the new global model differs. Client k's update `u_k` (the model it returned
minus the model it received) is a task vector, and the global model moves by

    global + lambda * merge_task_vectors([u_1 .. u_K], settings)

where `merge_task_vectors` is `fedsparse.merging`'s one general merge, with these settings:

- `ties`: magnitude trim of each update to its top `density` entries by |value| (over the whole update, as the TIES
  paper), sign election by mass, disjoint mean. Unweighted: every accepted client counts once, as every task does in
  TIES; the disjoint mean divides by the number of clients that kept an entry, which has no example-weighted form
  in `merge_task_vectors`, and weighting by scaling the updates first would change that mean into a scaled sum.
- `dare`: each update keeps every entry with probability 1 - `drop` and the kept ones are divided by 1 - `drop`,
  then the example-weighted mean (weights n_k / sum n, applied before the drop; as the drop is elementwise and
  linear, that equals weighting after it). With drop 0 it is FedAvg's weighted mean.

Invariants:
- The merge covers the model's floating-point state-dict entries; non-float entries (integer buffers such as a
  counter) get FedAvg's aggregate (`aggregation`'s mean of their updates), without lambda.
- The DARE draws are a function of (`seed`, server round, position of the update among the round's accepted updates
  sorted by partition): a resumed run, or a rerun, draws the same drops. The strategies keep nothing across rounds
  (`state_dict()` is empty), so a checkpoint needs nothing more.
- No mask ever exists: the whole model travels dense in float32 both ways, so the bytes equal FedAvg's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedsparse import sparse
from fedsparse.merging.merge import MergeSettings, merge_task_vectors
from server.strategies.base import FedAvg, log


class MergeAggregate(FedAvg):
    """FedAvg whose aggregate of the float entries is a task-vector merge of the updates (see the module docstring).

    Parameters (keyword only, besides FedAvg's)
    -------------------------------------------
    scale : lambda, the factor of the merged update added to the global model (> 0; 1 = the merged update as is).

    Subclasses say how to merge: `merge_settings()` and `task_weights(num_examples)`. `aggregation` must be
    "mean" (the merge replaces the mean; a median or trimmed mean of merged updates is not defined here).
    """

    config_keys: frozenset[str] = frozenset({"sparse.mask-layers", "aggregate.lambda"})

    def __init__(self, *, maskable: Sequence[str], scale: float = 1.0, **kwargs) -> None:
        if not (scale > 0 and np.isfinite(scale)):
            raise ValueError(f"scale (lambda) must be a finite number > 0, got {scale}")
        super().__init__(maskable=maskable, **kwargs)
        if self.aggregation != "mean":
            raise ValueError(f"strategy {self.name} merges the updates instead of averaging them: aggregation must "
                             f"be 'mean', got {self.aggregation!r}")
        self.scale = scale
        self.float_keys: frozenset[str] = frozenset()  # fixed with the layout by the first `bind`
        self.aggregating_round = 0  # the round `aggregate_train` is aggregating (seeds DARE); 0 outside one

    @classmethod
    def config_arguments(cls, cfg: dict) -> dict:
        """FedAvg's arguments plus scale (`aggregate.lambda`)."""
        return {**super().config_arguments(cfg), "scale": cfg["aggregate.lambda"]}

    # ---- what a subclass says
    def merge_settings(self) -> MergeSettings:
        """The steps of the merge (sparsify, sign consensus, aggregate); its `scale` is not used (see `scale`)."""
        raise NotImplementedError

    def task_weights(self, num_examples: Sequence[int]) -> list[float]:
        """The factor each update is multiplied by before the merge (1 each: unweighted)."""
        return [1.0] * len(num_examples)

    def round_seed(self, server_round: int) -> int:
        """The seed of `server_round`'s merge (update t of the round draws with round_seed + t), from (seed, round)."""
        return int(np.random.SeedSequence([self.seed, server_round]).generate_state(1)[0])

    # ---- FedAvg's steps
    def summary(self) -> None:
        """Log FedAvg's settings and the merge's."""
        super().summary()
        settings = self.merge_settings()
        log.info("%s aggregation: sparsify %s (density %g), sign consensus %s, %s, lambda %g", self.name,
                 settings.sparsify, settings.density, settings.sign_consensus, settings.aggregate, self.scale)

    def bind(self, arrays: ArrayRecord) -> sparse.State:
        """FedAvg's bind; the first call also records which entries are floating point (the ones merged)."""
        state = super().bind(arrays)
        if not self.float_keys:
            self.float_keys = frozenset(k for k, v in state.items() if torch.is_floating_point(v))
        return state

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's `aggregate_train`, with `combine` merging the updates (seeded by `server_round`)."""
        self.aggregating_round = server_round
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.aggregating_round = 0

    def combine(self, parts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """lambda x the merge of the (num-examples, flat update) pairs (sorted by partition) on the float entries;
        FedAvg's aggregate on the others. `parts` are whole-model updates in the layout's order (no mask)."""
        if self.layout is None:
            raise ValueError("combine before bind: the strategy has no model layout yet")
        names = self.layout.maskable + self.layout.dense
        expected = self.layout.numel(names)
        for _, update in parts:
            if update.numel() != expected:
                raise ValueError(f"an update of {update.numel()} values, the model has {expected}")
        fallback = super().combine(parts)
        merged_keys = [k for k in names if k in self.float_keys]
        if not merged_keys:
            return fallback
        weights = self.task_weights([n for n, _ in parts])
        vectors = []
        for weight, (_, update) in zip(weights, parts, strict=True):
            tensors = sparse.split_flat(update.double(), self.layout, names)
            vectors.append({k: weight * tensors[k] for k in merged_keys})
        merged = merge_task_vectors(vectors, self.merge_settings(), seed=self.round_seed(self.aggregating_round))
        result = sparse.split_flat(fallback.clone(), self.layout, names)  # views into one flat tensor
        for key in merged_keys:
            result[key].copy_((self.scale * merged[key]).to(result[key].dtype))
        return sparse.flatten(result, names)


class TiesAggregate(MergeAggregate):
    """TIES as the aggregate: trim each update to its top `density` entries (whole update), elect signs by mass,
    disjoint mean; unweighted (module docstring).

    Parameters (keyword only, besides MergeAggregate's): density : share of each update kept, in (0, 1].
    """

    name = "ties"
    config_keys = MergeAggregate.config_keys | {"aggregate.density"}

    def __init__(self, *, maskable: Sequence[str], density: float = 0.2, **kwargs) -> None:
        self.settings = MergeSettings(sparsify="magnitude", density=density, scope="global",
                                      sign_consensus="ties", aggregate="disjoint_mean")  # ValueError if invalid
        super().__init__(maskable=maskable, **kwargs)

    @classmethod
    def config_arguments(cls, cfg: dict) -> dict:
        """MergeAggregate's arguments plus density (`aggregate.density`)."""
        return {**super().config_arguments(cfg), "density": cfg["aggregate.density"]}

    def merge_settings(self) -> MergeSettings:
        """Magnitude trim (global scope), TIES sign election, disjoint mean."""
        return self.settings


class DareAggregate(MergeAggregate):
    """DARE as the aggregate: drop each entry of each update with probability `drop`, rescale the kept ones by
    1/(1 - drop), example-weighted mean (module docstring).

    Parameters (keyword only, besides MergeAggregate's): drop : the drop rate p, in [0, 1).
    """

    name = "dare"
    config_keys = MergeAggregate.config_keys | {"aggregate.drop"}

    def __init__(self, *, maskable: Sequence[str], drop: float = 0.5, **kwargs) -> None:
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {drop}")
        self.settings = MergeSettings(sparsify="dare", density=1.0 - drop, aggregate="sum")
        super().__init__(maskable=maskable, **kwargs)

    @classmethod
    def config_arguments(cls, cfg: dict) -> dict:
        """MergeAggregate's arguments plus drop (`aggregate.drop`)."""
        return {**super().config_arguments(cfg), "drop": cfg["aggregate.drop"]}

    def merge_settings(self) -> MergeSettings:
        """DARE drop and rescale, then the sum of the (already example-weighted) updates."""
        return self.settings

    def task_weights(self, num_examples: Sequence[int]) -> list[float]:
        """n_k / sum n: the sum of the weighted updates is their example-weighted mean."""
        total = sum(num_examples)
        return [n / total for n in num_examples]
