"""The transfer experiment: transfer unlearning by data selection (Sepahvand et al., arXiv:2405.10425) as
federated rounds.

`TransferExperiment(cfg)` (registered as EXPERIMENTS["transfer"]) has two phases on the run's dataset, whose
classes are split at `transfer.source-classes` (`client.transfer` has the data views):
1. `pretrain`: `transfer.pretrain-rounds` FedAvg rounds on the clients' source-class examples.
2. `transfer:<method>`: at its start (`on_start`) the server gives the model a fresh classifier head (seeded), and
   for `data_selection` sends the pretrained model to every client (`query.transfer_select`, one-off traffic): each
   selects, for each of its non-static target examples, the `transfer.neighbours` nearest images of the public
   auxiliary pool in the pretrained model's features. Then `transfer.rounds` FedAvg rounds on the target classes:
   `static_only` trains on the static examples (exact unlearning, the lower baseline), `all_data` on all of them
   (the upper bound: a withdrawal would need retraining), `data_selection` on static + selected pool images.

Evaluators: the pretrain phase scores the source classes' test images (`acc/source`); the transfer phase the
target classes' (`acc/target`, first, so it is the run's `test_accuracy`) and the source classes'.

What this gives a user: with `data_selection` (and `static_only`), a client's non-static examples never reach a
gradient, so withdrawing them needs no unlearning: the final model does not depend on them except through which
pool images were chosen (the paper's relaxed definition of exact unlearning, about training use).

Invariants: the head reset is seeded (`seed + HEAD_SEED_OFFSET`), so a run is reproducible; the selection lives in
the clients' state (snapshotted for resume); a client without one rejects data_selection rounds with
`SelectionMissing` and the round goes on without it; the experiment's own state (selection counts and exchange
bytes) is in `state_dict()`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.transfer import PRETRAIN, SELECT_MESSAGE, TRAIN_MESSAGE, auxiliary_pool
from fedsparse import replies
from fedsparse.config import ConfigError
from fedsparse.data import load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.train import pick_device
from fedsparse.transport import ReplyError
from fedsparse.unlearning.transfer import HEAD_SEED_OFFSET, classifier_head
from server.experiments import Phase, PhaseContext, TestSetEvaluator
from server.grid import Bytes, counted_bytes
from server.strategies.base import FedAvg

log = logging.getLogger("fedsparse")


class TransferFailed(RuntimeError):
    """The transfer phase cannot start; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransferFedAvg(FedAvg):
    """FedAvg whose train messages are `train.transfer` (the phase's `client_config` adds the `stage`)."""

    message_type = TRAIN_MESSAGE


class TransferExperiment:
    """The phases of a transfer-unlearning run and the server side of the selection exchange (module docstring)."""

    config_namespaces: frozenset[str] = frozenset({"transfer"})

    def __init__(self, cfg: dict) -> None:
        self.check_config(cfg)
        self.cfg = cfg
        data = load_dataset(cfg["dataset"], cfg["data-root"])
        device = pick_device(cfg["device"])
        self.model: torch.nn.Module = build_model(cfg["model"], data.input_shape, data.num_classes, seed=cfg["seed"])
        self.fresh_head_model = build_model(cfg["model"], data.input_shape, data.num_classes,
                                            seed=cfg["seed"] + HEAD_SEED_OFFSET)
        self.selection: dict[str, int] = {}  # data_selection: selected / distinct / non-static over the clients
        self.exchange = Bytes()  # bytes of the selection exchange
        split = cfg["transfer.source-classes"]
        source, target = data.y_test < split, data.y_test >= split
        source_eval = TestSetEvaluator("source", data.x_test[source], data.y_test[source], device)
        target_eval = TestSetEvaluator("target", data.x_test[target], data.y_test[target], device)
        maskable = list(maskable_names(self.model, tuple(cfg["sparse.mask-layers"].split(","))))
        bound = len(data.y_train[: cfg["train-subset"] or None]) * max(1, cfg["transfer.neighbours"])
        strategies = [TransferFedAvg(maskable=maskable, **FedAvg.config_arguments(cfg)) for _ in range(2)]
        for strategy in strategies:
            strategy.max_examples = bound
        self.phases: list[Phase] = [
            Phase(name=PRETRAIN, task=cfg["dataset"], rounds=cfg["transfer.pretrain-rounds"], strategy=strategies[0],
                  evaluators=[source_eval], client_config={"stage": PRETRAIN}),
            Phase(name=f"transfer:{self.method}", task=cfg["dataset"], rounds=cfg["transfer.rounds"],
                  strategy=strategies[1], evaluators=[target_eval, source_eval],
                  client_config={"stage": self.method}, on_start=self.on_start),
        ]

    @staticmethod
    def check_config(cfg: dict) -> None:
        """ConfigError naming the key when the settings cannot host the experiment: another strategy than fedavg,
        `num-rounds` other than the two phases' rounds, no class left for the target, or no room for the
        auxiliary pool after `train-subset`. `fedsparse run` calls it before Ray starts."""
        if cfg["strategy"] != "fedavg":
            raise ConfigError(f"config key 'strategy': the transfer experiment runs fedavg, got {cfg['strategy']!r}")
        wanted = cfg["transfer.pretrain-rounds"] + cfg["transfer.rounds"]
        if cfg["num-rounds"] != wanted:
            raise ConfigError(f"config key 'num-rounds': transfer.pretrain-rounds + transfer.rounds = {wanted}, "
                              f"got {cfg['num-rounds']}")
        classes = load_dataset(cfg["dataset"], cfg["data-root"]).num_classes
        if not 1 <= cfg["transfer.source-classes"] < classes:
            raise ConfigError(f"config key 'transfer.source-classes': must leave target classes among the "
                              f"{classes} of {cfg['dataset']}, got {cfg['transfer.source-classes']}")
        if not cfg["train-subset"]:
            raise ConfigError("config key 'train-subset': the transfer experiment takes its auxiliary pool from the "
                              "training images after the federation's prefix: set train-subset > 0")
        try:
            auxiliary_pool(cfg)
        except ValueError as err:
            raise ConfigError(f"config key 'transfer.aux-size': {err}") from err

    @property
    def method(self) -> str:
        """The transfer method, `transfer.method`."""
        return self.cfg["transfer.method"]

    # ----------------------------------------------------------------------------------------------- hooks

    def on_start(self, ctx: PhaseContext) -> None:
        """A fresh classifier head for the target task; for data_selection, the clients select pool images with
        the pretrained model."""
        state = {k: v.clone() for k, v in ctx.arrays.to_torch_state_dict().items()}
        head_name, _ = classifier_head(self.model)
        fresh = self.fresh_head_model.state_dict()
        for key in (f"{head_name}.weight", f"{head_name}.bias"):
            if key in state:
                state[key] = fresh[key].clone()
        ctx.arrays = ArrayRecord(state)
        if self.method == "data_selection":
            self.ask_selection(ctx)

    def ask_selection(self, ctx: PhaseContext) -> None:
        """Send the pretrained model to every client for its selection; TransferFailed if no client selected."""
        before = counted_bytes(ctx.grid, SELECT_MESSAGE)
        content = RecordDict({"model": ctx.arrays, "config": ConfigRecord({"neighbours": self.cfg[
            "transfer.neighbours"]})})
        messages = [Message(content, dst_node_id=node, message_type=SELECT_MESSAGE)
                    for _, node in sorted(ctx.nodes.items())]
        totals = {"clients": 0, "selected": 0, "distinct": 0, "non-static": 0}
        for node_id, answer in ctx.exchange(messages).items():
            try:
                metrics = replies.get_record(answer, "metrics", MetricRecord)
                counts = {key: int(metrics[key]) for key in ("selected", "distinct", "non-static")}
            except (ReplyError, KeyError, ValueError, TypeError) as err:
                log.warning("node %s: selection reply rejected: %s", node_id, err)
                continue
            totals["clients"] += 1
            for key, value in counts.items():
                totals[key] += value
        if not totals["clients"]:
            raise TransferFailed("data_selection: no client answered the selection exchange")
        self.exchange = self.exchange + (counted_bytes(ctx.grid, SELECT_MESSAGE) - before)
        self.selection = totals
        log.info("data_selection: %d clients selected %d pool images (%d distinct) for %d non-static examples",
                 totals["clients"], totals["selected"], totals["distinct"], totals["non-static"])

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The selection counts and the exchange bytes, for the checkpoint."""
        return {"selection": dict(self.selection), "exchange": [self.exchange.down, self.exchange.up]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        self.selection = dict(state.get("selection", {}))
        down, up = state.get("exchange", [0, 0])
        self.exchange = Bytes(down, up)

    # ------------------------------------------------------------------------------------------ results

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """The method, the static fraction, the source accuracy after pretraining, the final target and source
        accuracies, the selection counts and the selection exchange's bytes."""
        pretrain = [row for row in rows if row.get("phase") == PRETRAIN]
        transfer = [row for row in rows if row.get("phase") == self.phases[1].name]
        extra: dict = {"transfer_method": self.method, "static_fraction": self.cfg["transfer.static-fraction"],
                       "selection": dict(self.selection),
                       "selection_bytes": {"down": self.exchange.down, "up": self.exchange.up}}
        if pretrain:
            extra["pretrained_source_accuracy"] = float(pretrain[-1]["acc/source"])
        if transfer:
            extra["target_accuracy"] = float(transfer[-1]["acc/target"])
            extra["source_accuracy_after"] = float(transfer[-1]["acc/source"])
            extra["best_target_accuracy"] = float(np.max([float(row["acc/target"]) for row in transfer]))
        return extra
