"""Strategy registry: the run-config key `strategy` picks one by name. Every entry is a Flower strategy
(`flwr.serverapp.strategy.FedAvg` subclass) built from a resolved config by `from_config(cfg, maskable)`."""

from __future__ import annotations

from server.strategies.base import FedAvg
from server.strategies.magnitude import MagnitudeMask
from server.strategies.masked import MaskedFedAvg
from server.strategies.merge_aggregation import DareAggregate, MergeAggregate, TiesAggregate
from server.strategies.random_mask import RandomMask
from server.strategies.ssfl import SSFL
from server.strategies.topk import TopK

STRATEGIES: dict[str, type[FedAvg]] = {cls.name: cls for cls in (FedAvg, SSFL, RandomMask, MagnitudeMask, TopK,
                                                               TiesAggregate, DareAggregate)}

__all__ = ["SSFL", "STRATEGIES", "DareAggregate", "FedAvg", "MagnitudeMask", "MaskedFedAvg", "MergeAggregate",
           "RandomMask", "TiesAggregate", "TopK"]
