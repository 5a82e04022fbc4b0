"""Dense warm-up, then a one-shot global magnitude mask from the server's model (a PruneFL-like baseline)."""

from __future__ import annotations

from fedsparse import sparse
from server.strategies.base import Channel
from server.strategies.masked import MaskedFedAvg


class MagnitudeMask(MaskedFedAvg):
    name = "magnitude"

    def mask_due(self, server_round: int) -> bool:
        return server_round > self.cfg["sparse.warmup-rounds"]

    def make_mask(self, channel: Channel, nodes: dict[int, int], state: sparse.State) -> sparse.Masks:
        return sparse.magnitude_mask(state, self.layout.maskable, self.target_density, self.cfg["sparse.mask-scope"])
