"""Random global mask at the same density as SSFL: the ablation that shows what saliency buys."""

from __future__ import annotations

from flwr.serverapp import Grid

from fedsparse import sparse
from server.strategies.masked import MaskedFedAvg


class RandomMask(MaskedFedAvg):
    """A uniformly random mask drawn from `seed`, made before round 1 (no exchange)."""

    name = "random"

    def make_mask(self, grid: Grid, nodes: dict[int, int], state: sparse.State) -> sparse.Masks:
        """A random mask of the target density over the maskable tensors, seeded by `seed`."""
        shapes = {k: self.layout.shapes[k] for k in self.layout.maskable}
        return sparse.random_mask(shapes, self.target_density, self.seed, self.mask_scope)
