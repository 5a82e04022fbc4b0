"""Random global mask at the same density as SSFL: the ablation that shows what saliency buys."""

from __future__ import annotations

from fedsparse import sparse
from server.strategies.base import Channel
from server.strategies.masked import MaskedFedAvg


class RandomMask(MaskedFedAvg):
    name = "random"

    def make_mask(self, channel: Channel, nodes: dict[int, int], state: sparse.State) -> sparse.Masks:
        shapes = {k: self.layout.shapes[k] for k in self.layout.maskable}
        return sparse.random_mask(shapes, self.target_density, self.cfg["seed"], self.cfg["sparse.mask-scope"])
