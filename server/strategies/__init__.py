"""Strategy registry: the run-config key `strategy` picks one by name."""

from __future__ import annotations

from server.strategies.base import FedAvg
from server.strategies.magnitude import MagnitudeMask
from server.strategies.random_mask import RandomMask
from server.strategies.ssfl import SSFL
from server.strategies.topk import TopK

STRATEGIES: dict[str, type[FedAvg]] = {cls.name: cls for cls in (FedAvg, SSFL, RandomMask, MagnitudeMask, TopK)}
