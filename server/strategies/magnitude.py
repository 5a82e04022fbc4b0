"""Dense warm-up, then a one-shot global magnitude mask from the server's model (a PruneFL-like baseline)."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.serverapp import Grid

from fedsparse import sparse
from server.strategies.masked import MaskedFedAvg


class MagnitudeMask(MaskedFedAvg):
    """`warmup_rounds` dense rounds, then the mask keeps the largest-magnitude weights of the global model.

    Parameters (keyword only, besides MaskedFedAvg's)
    -------------------------------------------------
    warmup_rounds : dense float32 rounds before the mask is made (>= 0).
    """

    name = "magnitude"
    config_keys: frozenset[str] = MaskedFedAvg.config_keys | {"sparse.warmup-rounds"}

    def __init__(self, *, maskable: Sequence[str], warmup_rounds: int = 1, **kwargs) -> None:
        if warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
        super().__init__(maskable=maskable, **kwargs)
        self.warmup_rounds = warmup_rounds

    @classmethod
    def config_arguments(cls, cfg: dict) -> dict:
        """MaskedFedAvg's arguments plus warmup_rounds."""
        return {**super().config_arguments(cfg), "warmup_rounds": cfg["sparse.warmup-rounds"]}

    def mask_due(self, server_round: int) -> bool:
        """After the warm-up rounds."""
        return server_round > self.warmup_rounds

    def make_mask(self, grid: Grid, nodes: dict[int, int], state: sparse.State) -> sparse.Masks:
        """The largest-magnitude weights of the global model at the target density."""
        return sparse.magnitude_mask(state, self.layout.maskable, self.target_density, self.mask_scope)
