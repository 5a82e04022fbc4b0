"""The unlearn experiment: a client withdraws from a trained federation, which then forgets its data.

`UnlearnExperiment(cfg)` (registered as EXPERIMENTS["unlearn"]) has two phases on the run's dataset:
1. `train`: `unlearn.train-rounds` FedAvg rounds on every client.
2. `unlearn:<method>`: client `unlearn.client` withdraws (its training data is the forget set) and `unlearn.rounds`
   rounds of `UnlearnFedAvg` run on the remaining clients only (`train.unlearn` messages; the withdrawn client is
   never sent one). `unlearn.method` decides the phase's start (`on_start`):
   - `retrain`: the global model goes back to the run's initial model (the oracle: the withdrawn client's data
     never reaches the model the phase ends with).
   - `finetune`: FedAvg goes on from the trained model.
   - `del` (federated DEL): the withdrawing client computes DEL's localization on its own data and sends the mask
     (`query.unlearn_mask`, packed bits; the scores never leave it); the server resets the selected parameters to a
     fresh initialisation (`fedsparse.unlearning.core.fresh_initialisation`) and installs the freeze mask
     (selected parameters plus the classifier head, as DEL finetunes) on the remaining clients
     (`query.unlearn_freeze`); their rounds train in freeze mode, so every parameter outside it keeps its value
     bit for bit (its update is exactly 0.0 from every client, and so is the aggregate).
Both one-off exchanges go through the counting grid, so their bytes are in `bytes_oneoff` (and reported apart).

Evaluators after every round: the test set (first, so `test_accuracy` follows it), the withdrawn client's training
data (`acc/forget`) and the remaining clients' training data (`acc/retain`). `finish` loads the final model and
scores it with `fedsparse.unlearning.evaluate.evaluate_model`: the loss-threshold MIA AUC (forget vs test), the
accuracies and the share of parameters changed against the trained model, and reports the bytes and rounds the
unlearning phase spent.

Invariants: the experiment's state (the initial and trained models, the mask, the exchange bytes, the freeze
fingerprint) is in `state_dict()`, so a resumed phase 2 goes on with the same freeze mask (the clients restore
theirs from their state snapshots).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from client.unlearning import (
    FREEZE_MESSAGE,
    MASK_MESSAGE,
    NO_FREEZE,
    TRAIN_MESSAGE,
    mask_fingerprint,
    pack_parameter_mask,
    unpack_parameter_mask,
)
from fedsparse import replies
from fedsparse.config import ConfigError
from fedsparse.data import client_split, load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.train import pick_device
from fedsparse.transport import ReplyError
from fedsparse.unlearning.core import ArrayData, Mask, fresh_initialisation, mask_union
from fedsparse.unlearning.evaluate import evaluate_model
from fedsparse.unlearning.localization import mask_fraction, reset_masked
from fedsparse.unlearning.methods.deletion_by_localization import head_mask
from server.experiments import Phase, PhaseContext, TestSetEvaluator
from server.grid import Bytes
from server.strategies.base import FedAvg

log = logging.getLogger("fedsparse")


class UnlearnError(RuntimeError):
    """An unlearning exchange failed in a way the run cannot go on from; `reason` says which and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnlearnFedAvg(FedAvg):
    """FedAvg of the unlearning phase: `train.unlearn` messages to every sampled partition except `excluded`, with
    the freeze mask's fingerprint in the train config (`NO_FREEZE` while none is installed)."""

    message_type = TRAIN_MESSAGE

    def __init__(self, *, excluded: frozenset[int] = frozenset(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.excluded = excluded
        self.freeze_fingerprint = NO_FREEZE

    def train_config(self, server_round: int, extra: ConfigRecord | None = None) -> ConfigRecord:
        """FedAvg's train config plus `freeze-fingerprint`."""
        config = super().train_config(server_round, extra)
        config["freeze-fingerprint"] = self.freeze_fingerprint
        return config

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> list[Message]:
        """FedAvg's train messages, less those to an excluded partition (the withdrawn client)."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        excluded_nodes = {node for partition, node in self.roster.partitions().items() if partition in self.excluded}
        kept = [message for message in messages if message.metadata.dst_node_id not in excluded_nodes]
        self.plans[server_round] = dataclasses.replace(self.plans[server_round], messages=kept)
        return kept


def partition_data(cfg: dict, partitions: list[int]) -> ArrayData:
    """The training examples of these clients, concatenated in partition order."""
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    index = np.concatenate([client_split(cfg, partition)[0] for partition in partitions])
    return ArrayData(np.ascontiguousarray(data.x_train[index], dtype=np.float32),
                     np.ascontiguousarray(data.y_train[index], dtype=np.int64))


def exchange_bytes(grid: object, message_type: str) -> Bytes:
    """Bytes the counting grid has carried for `message_type` (none for a grid that does not count)."""
    counted = getattr(grid, "by_type", {}).get(message_type)
    return Bytes() if counted is None else Bytes(counted.down, counted.up)


class UnlearnExperiment:
    """The phases of a client-withdrawal run and the server side of its unlearning method (module docstring)."""

    config_namespaces: frozenset[str] = frozenset({"unlearn"})

    def __init__(self, cfg: dict) -> None:
        self.check_config(cfg)
        self.cfg = cfg
        data = load_dataset(cfg["dataset"], cfg["data-root"])
        device = pick_device(cfg["device"])
        self.model: torch.nn.Module = build_model(cfg["model"], data.input_shape, data.num_classes, seed=cfg["seed"])
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.trained: dict[str, torch.Tensor] | None = None  # the global model when the client withdrew
        self.mask: Mask | None = None  # del: the withdrawn client's localization mask
        self.exchange: dict[str, Bytes] = {}  # message type -> bytes of the method's one-off exchanges
        withdrawn = cfg["unlearn.client"]
        self.forget = partition_data(cfg, [withdrawn])
        self.retain = partition_data(cfg, [p for p in range(cfg["num-clients"]) if p != withdrawn])
        self.test = ArrayData(data.x_test.astype(np.float32), data.y_test.astype(np.int64))
        evaluators = [TestSetEvaluator("test", self.test.x, self.test.y, device),
                      TestSetEvaluator("forget", self.forget.x, self.forget.y, device),
                      TestSetEvaluator("retain", self.retain.x, self.retain.y, device)]
        maskable = list(maskable_names(self.model, tuple(cfg["sparse.mask-layers"].split(","))))
        train = FedAvg.from_config(cfg, maskable)
        self.strategy = UnlearnFedAvg(maskable=maskable, excluded=frozenset({withdrawn}),
                                      **FedAvg.config_arguments(cfg))
        for strategy in (train, self.strategy):
            strategy.max_examples = len(data.y_train[: cfg["train-subset"] or None])
        self.phases: list[Phase] = [
            Phase(name="train", task=cfg["dataset"], rounds=cfg["unlearn.train-rounds"], strategy=train,
                  evaluators=evaluators),
            Phase(name=f"unlearn:{self.method}", task=cfg["dataset"], rounds=cfg["unlearn.rounds"],
                  strategy=self.strategy, evaluators=evaluators, on_start=self.on_start),
        ]

    @staticmethod
    def check_config(cfg: dict) -> None:
        """ConfigError naming the key when the settings cannot host a withdrawal: another strategy than fedavg,
        fewer than 2 clients, `unlearn.client` not a client, `num-rounds` other than the two phases' rounds.
        `fedsparse run` calls it before Ray starts."""
        if cfg["strategy"] != "fedavg":
            raise ConfigError(f"config key 'strategy': the unlearn experiment runs fedavg, got {cfg['strategy']!r}")
        if cfg["num-clients"] < 2:
            raise ConfigError("config key 'num-clients': a withdrawal needs at least 2 clients")
        if cfg["unlearn.client"] >= cfg["num-clients"]:
            raise ConfigError(f"config key 'unlearn.client': {cfg['unlearn.client']} is not a partition id of "
                              f"num-clients={cfg['num-clients']}")
        wanted = cfg["unlearn.train-rounds"] + cfg["unlearn.rounds"]
        if cfg["num-rounds"] != wanted:
            raise ConfigError(f"config key 'num-rounds': unlearn.train-rounds + unlearn.rounds = {wanted}, got "
                              f"{cfg['num-rounds']}")

    @property
    def method(self) -> str:
        """The unlearning method, `unlearn.method`."""
        return self.cfg["unlearn.method"]

    # ----------------------------------------------------------------------------------------------- hooks

    def on_start(self, ctx: PhaseContext) -> None:
        """The client withdraws: keep the trained model, then start the method (module docstring)."""
        self.trained = {k: v.detach().clone() for k, v in ctx.arrays.to_torch_state_dict().items()}
        if self.method == "retrain":
            ctx.arrays = ArrayRecord({k: v.clone() for k, v in self.initial.items()})
        elif self.method == "del":
            ctx.arrays = self.localize_and_reset(ctx)

    def localize_and_reset(self, ctx: PhaseContext) -> ArrayRecord:
        """Federated DEL's start: the withdrawn client's mask, the reset, the freeze mask on the others."""
        withdrawn = self.cfg["unlearn.client"]
        if withdrawn not in ctx.nodes:
            raise UnlearnError(f"del: the withdrawing client (partition {withdrawn}) is not connected: it alone "
                               "holds the data to localize")
        content = RecordDict({"model": ctx.arrays, "config": ConfigRecord({"alpha": self.cfg["unlearn.alpha"]})})
        reply = self._ask(ctx, {withdrawn: ctx.nodes[withdrawn]}, content, MASK_MESSAGE).get(ctx.nodes[withdrawn])
        if reply is None:
            raise UnlearnError("del: the withdrawing client sent no mask")
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.trained)
        try:
            bits = replies.get_record(reply, "mask", ArrayRecord)["bits"].numpy()
            self.mask = unpack_parameter_mask(bits, model)
        except (ReplyError, KeyError, ValueError) as err:
            raise UnlearnError(f"del: the withdrawing client's mask is unusable: {err}") from err
        log.info("del: client %d selected %.4f of the parameters", withdrawn, mask_fraction(self.mask, model))
        reset_masked(model, self.mask, fresh_initialisation(model, self.cfg["seed"]))
        self.install_freeze(ctx, mask_union(self.mask, head_mask(model)), model)
        return ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items()})

    def install_freeze(self, ctx: PhaseContext, trainable: Mask, model: torch.nn.Module) -> None:
        """Send the freeze mask to every remaining client; the rounds train in it once one confirms."""
        bits = pack_parameter_mask(trainable, model)
        fingerprint = mask_fingerprint(bits)
        remaining = {p: n for p, n in ctx.nodes.items() if p != self.cfg["unlearn.client"]}
        content = RecordDict({"mask": ArrayRecord({"bits": Array(bits)}),
                              "config": ConfigRecord({"fingerprint": fingerprint})})
        confirmed = 0
        for node_id, answer in self._ask(ctx, remaining, content, FREEZE_MESSAGE).items():
            try:
                got = replies.get_str(replies.get_record(answer, "config", ConfigRecord), "fingerprint")
                confirmed += got == fingerprint
            except ReplyError as err:
                log.warning("node %s: freeze install rejected: %s", node_id, err)
        if not confirmed:
            raise UnlearnError("del: no remaining client installed the freeze mask")
        self.strategy.freeze_fingerprint = fingerprint
        log.info("del: freeze mask %s installed on %d of %d remaining clients", fingerprint, confirmed,
                 len(remaining))

    def _ask(self, ctx: PhaseContext, nodes: dict[int, int], content: RecordDict, message_type: str
             ) -> dict[int, RecordDict]:
        """Send `content` as `message_type` to these {partition: node}; {node id: reply content} of the replies
        without an error (the others are logged). The bytes are counted by the grid and kept per type."""
        before = exchange_bytes(ctx.grid, message_type)
        messages = [Message(content, dst_node_id=node, message_type=message_type) for _, node in sorted(nodes.items())]
        answers = ctx.exchange(messages)
        self.exchange[message_type] = self.exchange.get(message_type, Bytes()) + (
            exchange_bytes(ctx.grid, message_type) - before)
        return answers

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The models, mask and exchange bytes kept for `finish`, and the freeze fingerprint, for the checkpoint."""
        return {"trained": self.trained, "mask": self.mask,
                "exchange": {kind: [counted.down, counted.up] for kind, counted in self.exchange.items()},
                "freeze-fingerprint": self.strategy.freeze_fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        self.trained, self.mask = state.get("trained"), state.get("mask")
        self.exchange = {kind: Bytes(down, up) for kind, (down, up) in state.get("exchange", {}).items()}
        self.strategy.freeze_fingerprint = state.get("freeze-fingerprint", NO_FREEZE)

    # ------------------------------------------------------------------------------------------ results

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """Score the final model (MIA AUC, accuracies, share of parameters changed against the trained model) and
        the trained one; report the unlearning phase's rounds and bytes."""
        extra: dict = {"unlearn_method": self.method, "unlearn_client": self.cfg["unlearn.client"]}
        final_path = Path(out_dir) / "final_model.pt"
        if self.trained is None or not final_path.exists():
            log.warning("the unlearning phase did not run: no unlearning metrics")
            return extra
        final, trained = copy.deepcopy(self.model), copy.deepcopy(self.model)
        final.load_state_dict(torch.load(final_path))
        trained.load_state_dict(self.trained)
        device = pick_device(self.cfg["device"])
        after = evaluate_model(final, trained, self.retain, self.forget, self.test, device=device)
        before = evaluate_model(trained, trained, self.retain, self.forget, self.test, device=device)
        phase = [row for row in rows if row.get("phase") == self.phases[1].name]
        round_bytes = sum(int(row["bytes_down"]) + int(row["bytes_up"]) for row in phase)
        oneoff = sum(counted.total for counted in self.exchange.values())
        extra.update({
            "forget_accuracy": after.forget_accuracy, "retain_accuracy": after.retain_accuracy,
            "test_accuracy_after": after.test_accuracy, "mia_auc": after.mia_auc,
            "fraction_changed": after.fraction_changed,
            "before": {"forget_accuracy": before.forget_accuracy, "retain_accuracy": before.retain_accuracy,
                       "test_accuracy": before.test_accuracy, "mia_auc": before.mia_auc},
            "unlearn_rounds": len(phase), "unlearn_round_bytes": round_bytes,
            "unlearn_oneoff_bytes": oneoff, "unlearn_bytes": round_bytes + oneoff,
            "unlearn_exchange_bytes": {kind: {"down": counted.down, "up": counted.up}
                                       for kind, counted in self.exchange.items()},
        })
        if self.mask is not None:
            extra["del_mask_fraction"] = mask_fraction(self.mask, final)
        return extra
