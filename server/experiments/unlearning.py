"""The unlearn experiment: a trained federation forgets a forget set (a withdrawn client's data, or samples).

`UnlearnExperiment(cfg)` (registered as EXPERIMENTS["unlearn"]) has two phases on the run's dataset:
1. `train`: `unlearn.train-rounds` FedAvg rounds on every client, on all its data.
2. `unlearn:<method>`: `unlearn.rounds` rounds of `UnlearnFedAvg` (`train.unlearn` messages), in which every client
   trains on its retain part only (`client.unlearning.forget_split`, by `unlearn.forget`: `client` = client
   `unlearn.client` withdraws and is never sent a message of the phase again; `client-samples`, `uniform`, `class` =
   sample-level: every client takes part, the forget examples never reach a gradient). `unlearn.method` decides the
   phase's start (`UnlearnExperiment.method_starts`, the one dispatch on the method):
   - `retrain`: the global model goes back to the run's initial model (the oracle: the forget set never reaches
     the model the phase ends with).
   - `finetune`: FedAvg goes on from the trained model.
   - `del` (federated DEL): the localization. With the forget set on one client (`client`, `client-samples`)
     that client computes DEL's localization on its forget part and sends the mask (`query.unlearn_mask`, packed
     bits; the scores never leave it). With it spread over clients (`uniform`, `class`) every connected client
     holding forget examples sends its unit scores (`query.unlearn_scores`: one per output channel, float32 or
     float16 by `unlearn.score-dtype`); the server combines the valid ones by their forget-size weighted mean and
     takes the top `unlearn.alpha` (`client.unlearning.mask_from_score_shares`, the holder's own selection: with
     one share it is the holder's mask, bit for bit). A malformed score reply (wrong length or dtype, non-finite,
     a forget count other than the server's) is rejected and logged; none valid fails the run. Then the server resets the selected parameters to a fresh initialisation
     (`fedsparse.unlearning.core.fresh_initialisation`) and installs the freeze mask (selected parameters plus the
     classifier head, as DEL finetunes) on the clients of the phase (`query.unlearn_freeze`); their rounds train in
     freeze mode, so every parameter outside it keeps its value bit for bit. With `unlearn.transport = "values"`
     the install also carries the frozen values once, and then each round only the trainable values (and the
     buffers) travel, down and up (`client.unlearning.freeze_layout`); the model is the same, bit for bit, as with
     the dense transport. A client without the mask (joined late, or lost its state) gets it before its next round.
   - `federaser` (FedEraser, Liu et al. 2021): during phase 1 the server stores the accepted update of every client
     of phase 2 every `unlearn.federaser-interval` rounds (rounds 1, 1 + interval, ...); phase 2 replays from the
     initial model one calibration round per stored round (so `unlearn.rounds` must be their number): the clients
     train `unlearn.federaser-epochs` x their usual local steps, and the server rescales each new update per tensor
     to the stored one's norm (`calibrate`) before the weighted mean. A client with no stored update for that round
     is left out of it. The store costs 4 bytes x parameters x clients x stored rounds (`federaser_stored_bytes` in
     summary.json), in the experiment's state (so in every checkpoint: a resumed run replays the same updates).
The one-off exchanges go through the counting grid, so their bytes are in `bytes_oneoff` (and reported apart).

Evaluators after every round: the test set (first, so `test_accuracy` follows it), the forget set (`acc/forget`) and
the retain set (`acc/retain`: every client's training data outside the forget set; for `client` the other clients'
data). `finish` loads the final model and scores it with `fedsparse.unlearning.evaluate.evaluate_model`: the
loss-threshold MIA AUC (forget vs test), the accuracies and the share of parameters changed against the trained
model, and reports the bytes and rounds the unlearning phase spent.

Invariants: the experiment's state (the trained model, the mask, the freeze mask's bits, the exchange bytes, the
FedEraser store) is in `state_dict()`, so a resumed phase 2 goes on with the same freeze mask and stored updates
(the server re-installs the freeze mask on the clients in the first resumed round).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from client.unlearning import (
    FREEZE_MESSAGE,
    FREEZE_MISSING,
    MASK_MESSAGE,
    NO_FREEZE,
    SCORE_DTYPES,
    SCORES_MESSAGE,
    TRAIN_MESSAGE,
    ScoreShare,
    complement,
    forget_split,
    freeze_layout,
    mask_fingerprint,
    mask_from_score_shares,
    pack_parameter_mask,
    unflatten_unit_scores,
    unpack_parameter_mask,
)
from fedsparse import replies, sparse
from fedsparse.config import UNLEARN_LOCAL_METHODS, ConfigError
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
from server.strategies.base import ClientUpdate, FedAvg

log = logging.getLogger("fedsparse")

SINGLE_HOLDER_FORGET_SETS = ("client", "client-samples")  # the forget set is on one client: it sends del's mask

StoredUpdates = dict[int, dict[int, torch.Tensor]]
"""FedEraser's store: training round -> partition id -> that client's accepted update (flat float32, the train
strategy's dense layout)."""


class UnlearnError(RuntimeError):
    """An unlearning exchange failed in a way the run cannot go on from; `reason` says which and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def exchange_bytes(grid: object, message_type: str) -> Bytes:
    """Bytes the counting grid has carried for `message_type` (none for a grid that does not count)."""
    counted = getattr(grid, "by_type", {}).get(message_type)
    return Bytes() if counted is None else Bytes(counted.down, counted.up)


# ------------------------------------------------------------------------------------------------ FedEraser


def stored_rounds(train_rounds: int, interval: int) -> list[int]:
    """The training rounds whose updates FedEraser stores: 1, 1 + interval, ... <= train_rounds."""
    return list(range(1, train_rounds + 1, interval))


def calibrate(old: torch.Tensor, new: torch.Tensor, layout: sparse.Layout) -> torch.Tensor:
    """FedEraser's calibrated update, tensor by tensor of `layout` (flat vectors in `layout.maskable +
    layout.dense` order): ||old_t|| * new_t / ||new_t||, the stored update's length in the new update's direction
    (0 where new_t is all zero). Norms in float64; the result is float32."""
    if old.shape != new.shape:
        raise ValueError(f"old and new updates differ in length: {tuple(old.shape)} vs {tuple(new.shape)}")
    names = layout.maskable + layout.dense
    olds, news = sparse.split_flat(old.double(), layout, names), sparse.split_flat(new.double(), layout, names)
    parts = []
    for name in names:
        new_norm = float(news[name].norm())
        scale = float(olds[name].norm()) / new_norm if new_norm > 0 else 0.0
        parts.append((news[name] * scale).reshape(-1))
    return torch.cat(parts).float() if parts else torch.zeros(0)


class RecordingFedAvg(FedAvg):
    """The training phase's FedAvg, which stores in `store` the accepted updates of the partitions not in
    `excluded` in the rounds `rounds` (FedEraser's retained updates)."""

    def __init__(self, *, store: StoredUpdates, rounds: Iterable[int], excluded: frozenset[int] = frozenset(),
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.store, self.rounds, self.excluded = store, frozenset(rounds), excluded
        self.recording: int | None = None  # the round aggregate_train is storing, if any

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregate; in a stored round the accepted updates are kept (`screen_norms`)."""
        self.recording = server_round if server_round in self.rounds else None
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.recording = None

    def screen_norms(self, readable: list[tuple[int, ClientUpdate]]) -> list[ClientUpdate]:
        """FedAvg's screening; the accepted updates are stored when the round is one to store."""
        accepted = super().screen_norms(readable)
        if self.recording is not None:
            self.store[self.recording] = {u.partition_id: u.dense.clone() for u in accepted
                                          if u.partition_id not in self.excluded}
        return accepted


# ------------------------------------------------------------------------------------- the unlearning rounds


@dataclasses.dataclass(frozen=True)
class FreezeMask:
    """DEL's freeze mask as the strategy installs it: the trainable entries (over `named_parameters`), their packed
    bits and fingerprint, and whether the rounds carry only the trainable values (`values_transport`)."""

    trainable: Mask
    bits: np.ndarray
    fingerprint: str
    values_transport: bool


class UnlearnFedAvg(FedAvg):
    """FedAvg of the unlearning phase: `train.unlearn` messages to every sampled partition except `excluded`.

    With a freeze mask (`set_freeze`) the train config names its fingerprint (`NO_FREEZE` while none is set), and
    before every round the mask goes to each client of the phase that does not hold it (`holders`: the nodes whose
    install reply echoed its fingerprint; a node answering FreezeMaskMissing loses the status). With the masked-values
    transport the strategy's layout is `freeze_layout` and its masks the trainable entries, so the base FedAvg
    sends, reads and averages only those values (and the buffers); the aggregate keeps every other entry at its
    value in the model sent. With FedEraser's `calibration` (stored round per phase round, `set_calibration`),
    every accepted update is calibrated against the same client's stored one before the mean."""

    message_type = TRAIN_MESSAGE

    def __init__(self, *, excluded: frozenset[int] = frozenset(), exchange: dict[str, Bytes] | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.excluded = excluded
        self.exchange = exchange if exchange is not None else {}  # message type -> one-off bytes (shared)
        self.freeze: FreezeMask | None = None
        self.holders: set[int] = set()
        self.sent_state: sparse.State | None = None  # the model of the last configure_train
        self.calibration: dict[int, dict[int, torch.Tensor]] | None = None  # server round -> partition -> update
        self.calibration_fraction = 1.0
        self.calibrating: dict[int, torch.Tensor] | None = None

    @property
    def freeze_fingerprint(self) -> str:
        """The fingerprint the train config names (`NO_FREEZE` without a freeze mask)."""
        return NO_FREEZE if self.freeze is None else self.freeze.fingerprint

    def set_freeze(self, freeze: FreezeMask, model: torch.nn.Module) -> None:
        """Train from now on in `freeze` (of `model`'s architecture); no node holds it yet."""
        self.freeze, self.holders = freeze, set()
        if freeze.values_transport:
            self.layout, self.masks, self.fingerprint = freeze_layout(model), freeze.trainable, freeze.fingerprint

    def set_calibration(self, calibration: dict[int, dict[int, torch.Tensor]], fraction: float) -> None:
        """FedEraser: {server round: {partition: stored update}} and the share of local steps a round runs."""
        self.calibration, self.calibration_fraction = calibration, fraction

    def participants(self) -> dict[int, int]:
        """{partition: node} of the known clients that take part in the phase (all but the excluded)."""
        return {p: n for p, n in self.roster.partitions().items() if p not in self.excluded}

    def train_config(self, server_round: int, extra: ConfigRecord | None = None) -> ConfigRecord:
        """FedAvg's train config plus `freeze-fingerprint` and, for FedEraser, `calibration-fraction`."""
        config = super().train_config(server_round, extra)
        config["freeze-fingerprint"] = self.freeze_fingerprint
        if self.calibration is not None:
            config["calibration-fraction"] = self.calibration_fraction
        return config

    def prepare(self, grid: Grid, server_round: int, state: sparse.State) -> sparse.State:
        """Install the freeze mask on the clients of the phase that lack it (a late joiner, a lost state)."""
        if self.freeze is not None:
            missing = {p: n for p, n in self.participants().items() if n not in self.holders}
            if missing:
                self.install_freeze(grid, missing, state)
        return state

    def install_freeze(self, grid: Grid, nodes: dict[int, int], state: sparse.State) -> int:
        """Send the freeze mask (and with the values transport the frozen values of `state`) to these
        {partition: node}; returns how many confirmed its fingerprint (they become holders)."""
        if self.freeze is None:
            raise ValueError("install_freeze before set_freeze: there is no freeze mask to install")
        records: dict = {"mask": ArrayRecord({"bits": Array(self.freeze.bits)}),
                         "config": ConfigRecord({"fingerprint": self.freeze.fingerprint})}
        if self.freeze.values_transport:
            frozen, _ = sparse.gather(state, self.layout, complement(self.freeze.trainable))
            records["frozen"] = ArrayRecord({"values": Array(frozen.numpy())})
        content = RecordDict(records)
        before = exchange_bytes(grid, FREEZE_MESSAGE)
        messages = [Message(content, dst_node_id=node, message_type=FREEZE_MESSAGE) for _, node in sorted(nodes.items())]
        answers = self.send(grid, messages)
        self.exchange[FREEZE_MESSAGE] = self.exchange.get(FREEZE_MESSAGE, Bytes()) + (
            exchange_bytes(grid, FREEZE_MESSAGE) - before)
        confirmed = 0
        for reply in answers.replies:
            node_id = int(reply.metadata.src_node_id)
            try:
                got = replies.get_str(replies.get_record(reply.content, "config", ConfigRecord), "fingerprint")
            except ReplyError as err:
                self.failures.add(node_id, f"rejected freeze install reply: {err}", FREEZE_MESSAGE)
                continue
            if got == self.freeze.fingerprint:
                self.holders.add(node_id)
                confirmed += 1
            else:
                self.failures.add(node_id, f"installed freeze mask {got}, expected {self.freeze.fingerprint}",
                                  FREEZE_MESSAGE)
        log.info("freeze mask %s installed on %d of %d clients", self.freeze.fingerprint, confirmed, len(nodes))
        return confirmed

    def note_client_errors(self, errors: dict[int, str]) -> None:
        """A node that says it holds no matching freeze mask loses its holder status: the next round installs."""
        for node_id, reason in errors.items():
            if FREEZE_MISSING in reason:
                self.holders.discard(node_id)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> list[Message]:
        """FedAvg's train messages, less those to an excluded partition (the withdrawn client)."""
        self.sent_state = arrays.to_torch_state_dict()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        excluded_nodes = {node for partition, node in self.roster.partitions().items() if partition in self.excluded}
        kept = [message for message in messages if message.metadata.dst_node_id not in excluded_nodes]
        self.plans[server_round] = dataclasses.replace(self.plans[server_round], messages=kept)
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregate (of calibrated updates for FedEraser); with the values transport every entry
        outside the freeze mask is taken from the model sent."""
        self.calibrating = None if self.calibration is None else self.calibration.get(server_round, {})
        try:
            arrays, metrics = super().aggregate_train(server_round, replies)
        finally:
            self.calibrating = None
        if arrays is None or self.freeze is None or not self.freeze.values_transport:
            return arrays, metrics
        new, sent = arrays.to_torch_state_dict(), self.sent_state
        trainable = self.freeze.trainable
        merged = {k: torch.where(trainable[k], v, sent[k].to(v.dtype)) if k in trainable else v for k, v in new.items()}
        return ArrayRecord(merged), metrics

    def screen_norms(self, readable: list[tuple[int, ClientUpdate]]) -> list[ClientUpdate]:
        """FedAvg's screening; for FedEraser each accepted update is calibrated against the stored one of its
        client (a client with none stored for the round is left out)."""
        accepted = super().screen_norms(readable)
        if self.calibrating is None:
            return accepted
        calibrated = []
        for update in accepted:
            old = self.calibrating.get(update.partition_id)
            if old is None:
                log.info("federaser: partition %d has no stored update for this round: left out", update.partition_id)
                continue
            calibrated.append(dataclasses.replace(update, dense=calibrate(old, update.dense, self.layout)))
        return calibrated


# ------------------------------------------------------------------------------------------------ data


def partition_data(cfg: dict, partitions: list[int]) -> ArrayData:
    """The training examples of these clients, concatenated in partition order."""
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    index = np.concatenate([client_split(cfg, partition)[0] for partition in partitions])
    return ArrayData(np.ascontiguousarray(data.x_train[index], dtype=np.float32),
                     np.ascontiguousarray(data.y_train[index], dtype=np.int64))


def forget_counts(cfg: dict) -> dict[int, int]:
    """{partition: number of its forget examples} (`client.unlearning.forget_split`, as the clients split)."""
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    return {partition: len(forget_split(cfg, partition, data.y_train[client_split(cfg, partition)[0]]).forget)
            for partition in range(cfg["num-clients"])}


def read_score_share(content: RecordDict, model: torch.nn.Module, dtype: str, num_examples: int) -> ScoreShare:
    """A `query.unlearn_scores` reply as a ScoreShare; ValueError when the scores are not a finite vector of
    `dtype` of the model's unit count, or the reply's forget count is not `num_examples` (the server's own count,
    which is the weight: a client cannot weigh more than its forget examples)."""
    try:
        flat = replies.get_record(content, "scores", ArrayRecord)["scores"].numpy()
        claimed = replies.get_int(replies.get_record(content, "metrics", MetricRecord), "num-examples", 0, 2**62)
    except (ReplyError, KeyError) as err:
        raise ValueError(f"unreadable score reply: {err}") from err
    if flat.dtype != SCORE_DTYPES[dtype]:
        raise ValueError(f"scores of dtype {flat.dtype}, asked for {dtype}")
    if claimed != num_examples:
        raise ValueError(f"claims {claimed} forget examples, holds {num_examples}")
    return ScoreShare(unflatten_unit_scores(flat, model), num_examples)


def forget_and_retain(cfg: dict) -> tuple[ArrayData, ArrayData]:
    """(forget, retain) over every client's training examples, by `client.unlearning.forget_split` (the clients'
    own split), concatenated in partition order."""
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    forget_index, retain_index = [], []
    for partition in range(cfg["num-clients"]):
        index = client_split(cfg, partition)[0]
        split = forget_split(cfg, partition, data.y_train[index])
        forget_index.append(index[split.forget])
        retain_index.append(index[split.retain])

    def subset(parts: list[np.ndarray]) -> ArrayData:
        index = np.concatenate(parts)
        return ArrayData(np.ascontiguousarray(data.x_train[index], dtype=np.float32),
                         np.ascontiguousarray(data.y_train[index], dtype=np.int64))

    return subset(forget_index), subset(retain_index)


# ------------------------------------------------------------------------------------------------ experiment


def local_strategy_class() -> type[UnlearnFedAvg]:
    """The phase strategy of the registry methods (`unlearn.method` in UNLEARN_LOCAL_METHODS): each client runs the
    method on its own retain / forget parts (`server.experiments.unlearning_local`, imported here: it subclasses
    UnlearnFedAvg)."""
    from server.experiments.unlearning_local import LocalUnlearnFedAvg

    return LocalUnlearnFedAvg


class UnlearnExperiment:
    """The phases of an unlearning run and the server side of its unlearning method (module docstring)."""

    config_namespaces: frozenset[str] = frozenset({"unlearn"})

    def __init__(self, cfg: dict) -> None:
        self.check_config(cfg)
        self.cfg = cfg
        data = load_dataset(cfg["dataset"], cfg["data-root"])
        if cfg["unlearn.forget"] == "class" and cfg["unlearn.forget-class"] >= data.num_classes:
            raise ConfigError(f"config key 'unlearn.forget-class': {cfg['unlearn.forget-class']} is not a class of "
                              f"{cfg['dataset']} ({data.num_classes} classes)")
        device = pick_device(cfg["device"])
        self.model: torch.nn.Module = build_model(cfg["model"], data.input_shape, data.num_classes, seed=cfg["seed"])
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.trained: dict[str, torch.Tensor] | None = None  # the global model when the unlearning started
        self.mask: Mask | None = None  # del: the localization mask
        self.exchange: dict[str, Bytes] = {}  # message type -> bytes of the method's one-off exchanges
        self.stored: StoredUpdates = {}  # federaser: the retained updates of phase 1
        self.forget, self.retain = forget_and_retain(cfg)
        if not len(self.forget) or not len(self.retain):
            raise ConfigError(f"config key 'unlearn.forget-fraction': the forget set {cfg['unlearn.forget']!r} has "
                              f"{len(self.forget)} examples and the retain set {len(self.retain)}: both need some")
        self.test = ArrayData(data.x_test.astype(np.float32), data.y_test.astype(np.int64))
        evaluators = [TestSetEvaluator("test", self.test.x, self.test.y, device),
                      TestSetEvaluator("forget", self.forget.x, self.forget.y, device),
                      TestSetEvaluator("retain", self.retain.x, self.retain.y, device)]
        maskable = list(maskable_names(self.model, tuple(cfg["sparse.mask-layers"].split(","))))
        excluded = frozenset({cfg["unlearn.client"]}) if cfg["unlearn.forget"] == "client" else frozenset()
        train = RecordingFedAvg(maskable=maskable, store=self.stored, excluded=excluded,
                                rounds=self.federaser_rounds if self.method == "federaser" else (),
                                **FedAvg.config_arguments(cfg))
        strategy_class = local_strategy_class() if self.method in UNLEARN_LOCAL_METHODS else UnlearnFedAvg
        self.strategy = strategy_class(maskable=maskable, excluded=excluded, exchange=self.exchange,
                                       **strategy_class.config_arguments(cfg))
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
        """ConfigError naming the key when the settings cannot host the unlearning: another strategy than fedavg,
        fewer than 2 clients, `unlearn.client` not a client, `num-rounds` other than the two phases' rounds,
        federaser with `unlearn.rounds` other than its stored rounds.
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
        if cfg["unlearn.method"] in UNLEARN_LOCAL_METHODS and cfg["unlearn.forget"] == "client":
            raise ConfigError(f"config key 'unlearn.forget': {cfg['unlearn.method']} runs on the clients holding "
                              "forget data, and with 'client' the one holding it withdraws: use client-samples, "
                              "uniform or class")
        if cfg["unlearn.method"] == "federaser":
            calibration = len(stored_rounds(cfg["unlearn.train-rounds"], cfg["unlearn.federaser-interval"]))
            if cfg["unlearn.rounds"] != calibration:
                raise ConfigError(f"config key 'unlearn.rounds': federaser replays one round per stored round, "
                                  f"ceil(unlearn.train-rounds / unlearn.federaser-interval) = {calibration}, got "
                                  f"{cfg['unlearn.rounds']}")

    @property
    def method(self) -> str:
        """The unlearning method, `unlearn.method`."""
        return self.cfg["unlearn.method"]

    @property
    def federaser_rounds(self) -> list[int]:
        """The training rounds whose updates FedEraser stores."""
        return stored_rounds(self.cfg["unlearn.train-rounds"], self.cfg["unlearn.federaser-interval"])

    # ----------------------------------------------------------------------------------------------- hooks

    def method_starts(self) -> dict[str, Callable[[PhaseContext], ArrayRecord]]:
        """`unlearn.method` -> the start of the unlearning phase: the global model its rounds start from."""
        return {"retrain": self.start_from_initial, "finetune": lambda ctx: ctx.arrays,
                "del": self.localize_and_reset, "federaser": self.start_federaser,
                **dict.fromkeys(UNLEARN_LOCAL_METHODS, lambda ctx: ctx.arrays)}  # from the trained model

    def on_start(self, ctx: PhaseContext) -> None:
        """The unlearning starts: keep the trained model, then start the method (`method_starts`)."""
        self.trained = {k: v.detach().clone() for k, v in ctx.arrays.to_torch_state_dict().items()}
        starts = self.method_starts()
        if self.method not in starts:
            raise UnlearnError(f"unlearn.method {self.method!r} has no start here (known: {', '.join(starts)})")
        ctx.arrays = starts[self.method](ctx)

    def start_from_initial(self, ctx: PhaseContext) -> ArrayRecord:
        """retrain: the run's initial model."""
        return ArrayRecord({k: v.clone() for k, v in self.initial.items()})

    def start_federaser(self, ctx: PhaseContext) -> ArrayRecord:
        """federaser: replay from the initial model, calibrating against the stored updates."""
        self.attach_calibration()
        return self.start_from_initial(ctx)

    def attach_calibration(self) -> None:
        """Give the unlearning strategy the stored updates, keyed by the run round that replays each."""
        offset = self.cfg["unlearn.train-rounds"]
        calibration = {offset + j: self.stored.get(stored, {}) for j, stored in enumerate(self.federaser_rounds, 1)}
        self.strategy.set_calibration(calibration, self.cfg["unlearn.federaser-epochs"])

    def localize_and_reset(self, ctx: PhaseContext) -> ArrayRecord:
        """Federated DEL's start: the localization mask (the holder's, or the combined scores of the holders), the
        reset, the freeze mask on the clients of the phase."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.trained)
        if self.cfg["unlearn.forget"] in SINGLE_HOLDER_FORGET_SETS:
            self.mask = self.holder_mask(ctx, model)
        else:
            self.mask = self.combined_mask(ctx, model)
        reset_masked(model, self.mask, fresh_initialisation(model, self.cfg["seed"]))
        self.set_freeze(model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not self.strategy.install_freeze(ctx.grid, self.strategy.participants(), state):
            raise UnlearnError("del: no client of the phase installed the freeze mask")
        return ArrayRecord(state)

    def holder_mask(self, ctx: PhaseContext, model: torch.nn.Module) -> Mask:
        """The mask the one client holding the forget set computes and sends (`query.unlearn_mask`)."""
        holder = self.cfg["unlearn.client"]
        if holder not in ctx.nodes:
            raise UnlearnError(f"del: the client holding the forget set (partition {holder}) is not connected: it "
                               "alone holds the data to localize")
        content = RecordDict({"model": ctx.arrays, "config": ConfigRecord({"alpha": self.cfg["unlearn.alpha"]})})
        reply = self._ask(ctx, {holder: ctx.nodes[holder]}, content, MASK_MESSAGE).get(ctx.nodes[holder])
        if reply is None:
            raise UnlearnError("del: the client holding the forget set sent no mask")
        try:
            bits = replies.get_record(reply, "mask", ArrayRecord)["bits"].numpy()
            mask = unpack_parameter_mask(bits, model)
        except (ReplyError, KeyError, ValueError) as err:
            raise UnlearnError(f"del: the forget set holder's mask is unusable: {err}") from err
        log.info("del: client %d selected %.4f of the parameters", holder, mask_fraction(mask, model))
        return mask

    def combined_mask(self, ctx: PhaseContext, model: torch.nn.Module) -> Mask:
        """The mask from the unit scores of every connected client holding forget examples
        (`query.unlearn_scores`), combined by their forget-size weighted mean: each client's scores speak for its
        forget examples, as FedAvg weighs updates, so a client with 3 forget examples moves the ranking less than
        one with 300 (the selection only ranks, so a weighted mean and a weighted sum select the same). Malformed
        replies are rejected and logged; UnlearnError when none is valid."""
        counts = forget_counts(self.cfg)
        holders = {p: node for p, node in ctx.nodes.items() if counts.get(p, 0) > 0}
        if not holders:
            raise UnlearnError("del: no connected client holds examples of the forget set: nothing to localize")
        dtype = self.cfg["unlearn.score-dtype"]
        content = RecordDict({"model": ctx.arrays, "config": ConfigRecord({"score-dtype": dtype})})
        answers = self._ask(ctx, holders, content, SCORES_MESSAGE)
        shares = []
        for partition, node in sorted(holders.items()):
            if node not in answers:
                continue  # an error reply, logged by the exchange
            try:
                shares.append(read_score_share(answers[node], model, dtype, counts[partition]))
            except ValueError as err:
                log.warning("del: rejected the localization scores of partition %d: %s", partition, err)
        if not shares:
            raise UnlearnError(f"del: none of the {len(holders)} clients holding forget examples sent usable "
                               "localization scores")
        mask = mask_from_score_shares(shares, model, self.cfg["unlearn.alpha"])
        log.info("del: the scores of %d of %d forget-set holders (%d forget examples) selected %.4f of the "
                 "parameters", len(shares), len(holders), sum(share.num_examples for share in shares),
                 mask_fraction(mask, model))
        return mask

    def set_freeze(self, model: torch.nn.Module) -> None:
        """The unlearning strategy trains in DEL's freeze mask: the localization mask plus the classifier head."""
        trainable = mask_union(self.mask, head_mask(model))
        trainable = {name: trainable.get(name, torch.zeros_like(p, dtype=torch.bool))
                     for name, p in model.named_parameters()}
        bits = pack_parameter_mask(trainable, model)
        self.strategy.set_freeze(FreezeMask(trainable, bits, mask_fingerprint(bits),
                                            self.cfg["unlearn.transport"] == "values"), model)

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
        """The trained model, mask, exchange bytes and FedEraser store kept for the unlearning phase and `finish`,
        and the freeze fingerprint, for the checkpoint."""
        return {"trained": self.trained, "mask": self.mask,
                "exchange": {kind: [counted.down, counted.up] for kind, counted in self.exchange.items()},
                "freeze-fingerprint": self.strategy.freeze_fingerprint, "federaser-updates": self.stored}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved; in the unlearning phase the strategy gets its freeze mask (installed
        again on the clients at the next round) and FedEraser's calibration back."""
        self.trained, self.mask = state.get("trained"), state.get("mask")
        self.exchange.clear()
        self.exchange.update({kind: Bytes(down, up) for kind, (down, up) in state.get("exchange", {}).items()})
        self.stored.clear()
        self.stored.update(state.get("federaser-updates", {}))
        if self.trained is None:
            return
        if self.mask is not None and state.get("freeze-fingerprint", NO_FREEZE) != NO_FREEZE:
            model = copy.deepcopy(self.model)
            self.set_freeze(model)
        if self.method == "federaser":
            self.attach_calibration()

    # ------------------------------------------------------------------------------------------ results

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """Score the final model (MIA AUC, accuracies, share of parameters changed against the trained model) and
        the trained one; report the unlearning phase's rounds and bytes."""
        extra: dict = {"unlearn_method": self.method, "unlearn_client": self.cfg["unlearn.client"],
                       "unlearn_forget": self.cfg["unlearn.forget"], "forget_examples": len(self.forget),
                       "retain_examples": len(self.retain)}
        if self.method == "federaser":
            extra["federaser_stored_rounds"] = len(self.stored)
            extra["federaser_stored_bytes"] = sum(4 * u.numel() for kept in self.stored.values()
                                                  for u in kept.values())
        if self.method == "del":
            extra["unlearn_transport"] = self.cfg["unlearn.transport"]
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
