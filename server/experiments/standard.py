"""The standard experiment: one phase ("train") of the configured strategy on the configured dataset, scored on
its test set after every round. Every run before phases existed is this experiment, with the same messages,
bytes and results."""

from __future__ import annotations

from pathlib import Path

import torch

from server.experiments import Phase, TestSetEvaluator


class StandardExperiment:
    """`num-rounds` rounds of `strategy` on `dataset`; no state of its own, no extra results."""

    config_namespaces: frozenset[str] = frozenset()

    def __init__(self, cfg: dict) -> None:
        from fedsparse.data import input_stats, load_dataset
        from fedsparse.models import build_model, maskable_names
        from fedsparse.train import pick_device
        from server.strategies import STRATEGIES

        data = load_dataset(cfg["dataset"], cfg["data-root"])
        self.model: torch.nn.Module = build_model(cfg["model"], data.input_shape, data.num_classes, seed=cfg["seed"])
        patterns = tuple(cfg["sparse.mask-layers"].split(","))
        strategy = STRATEGIES[cfg["strategy"]].from_config(cfg, maskable_names(self.model, patterns))
        strategy.max_examples = len(data.y_train[: cfg["train-subset"] or None])  # no client holds more
        evaluator = TestSetEvaluator(cfg["dataset"], data.x_test, data.y_test, pick_device(cfg["device"]),
                                     normalize=input_stats(cfg))
        self.phases: list[Phase] = [Phase(name="train", task=cfg["dataset"], rounds=cfg["num-rounds"],
                                          strategy=strategy, evaluators=[evaluator])]

    def state_dict(self) -> dict:
        """Nothing to keep: the strategy's own state is checkpointed by the runner."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """No extra files or summary entries."""
        return {}
