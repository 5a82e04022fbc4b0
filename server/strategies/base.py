"""fedsparse's FedAvg, a Flower strategy (`flwr.serverapp.strategy.FedAvg`), and the machinery its subclasses share.

Hooks, as in Flower (`Strategy.start` or the fedsparse runner call them):
- `configure_train(server_round, arrays, config, grid)`: samples the round's partitions seeded by (seed, round),
  learns which nodes hold them (query.info: with `discovery="all"` every node, the first time and whenever new ones
  connect; with `discovery="on-demand"` only the nodes of the sampled partitions, see `server.strategies.nodes`),
  runs the one-off exchanges of `prepare` (SSFL's saliency, the mask install) through the same grid, and returns
  the train messages.
- `aggregate_train(server_round, replies)`: validates every reply, aggregates the accepted ones, returns the new
  dense global model and the round's metrics.
- `configure_evaluate` / `aggregate_evaluate`: no federated evaluation (fedsparse evaluates the global model
  centrally: `evaluate_fn` of `start`, or the runner's evaluators).

State between the two train hooks is explicit: `configure_train` stores a `RoundPlan` in `self.plans[server_round]`
(the model it sent, the mask and fingerprint replies must match, the messages, the logical bytes) and
`aggregate_train` pops it. Everything else a strategy keeps across rounds is in `state_dict()`.

Every reply is read through `fedsparse.replies` (one validation path); a reply that fails it, an error reply and a
missing reply are logged with the node id and reason, recorded in `self.failures`, and the round goes on with the
others. What is aggregated is bounded: a client's weight is at most the example count it reported at discovery,
an update whose norm exceeds `max_update_norm_ratio` x the round's median update norm is rejected, and a
non-finite aggregate is never returned (the round then returns no arrays).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedsparse import replies, sparse, transport
from fedsparse.config import AGGREGATIONS
from fedsparse.replies import NodeInfo
from fedsparse.sparse import coordinate_median, trimmed_mean, weighted_mean
from fedsparse.transport import ReplyError
from server.strategies.nodes import (
    Exchange,
    Failures,
    InfoQuery,
    Roster,
    exchange,
    registration_order,
    sample_partitions,
    sort_replies,
    wait_for_nodes,
)

log = logging.getLogger("fedsparse")

MAX_EXAMPLES = 2**62
DISCOVERY_MODES = ("all", "on-demand")


@dataclass(frozen=True)
class ClientUpdate:
    """One readable train reply: its partition, weight, loss, the decoded float32 updates and its logical bytes."""

    partition_id: int
    num_examples: int
    train_loss: float
    values: torch.Tensor
    dense: torch.Tensor
    logical_bytes: int


@dataclass
class RoundPlan:
    """What `configure_train` decided for a round, read back by `aggregate_train` of the same round.

    `global_state` is the model the messages carry (masked when a mask exists): replies are updates to it.
    `masks` / `fingerprint` are the mask the replies must have been made with; `messages` are the instructions
    (the grid sets their ids, which map every reply, error replies included, to its node); `logical_down` is
    the logical payload bytes of one message."""

    server_round: int
    global_state: sparse.State
    masks: sparse.Masks | None
    fingerprint: str
    messages: list[Message]
    logical_down: int


class FedAvg(FlowerFedAvg):
    """Dense FedAvg: the whole model travels as float32 both ways; the global model moves by the example-weighted
    mean of the clients' updates (= the weighted mean of their models), or their median / trimmed mean.

    Parameters (keyword only)
    -------------------------
    maskable : the state-dict names whose weights a mask may prune; they also fix the payload order (maskable
        tensors first, then the others).
    num_clients : the number of partitions (client ids 0 .. num_clients-1); None: the nodes connected at the
        first discovery.
    fraction_train : share of the partitions trained per round (at least one).
    lr, lr_decay : the clients' learning rate in round r is lr * lr_decay**(r-1), sent in the train config.
    aggregation : "mean" (example-weighted), "median" or "trimmed-mean" (coordinate-wise, unweighted).
    trim_fraction : the share trimmed at each end by "trimmed-mean".
    max_update_norm_ratio : reject an update whose L2 norm exceeds this times the round's median norm (0: off).
    seed : seeds the sampling of partitions (with the round number).
    max_examples : the most examples a node may report at discovery (None: no bound beyond 2**62).
    min_available_nodes : nodes to wait for before the first discovery, for up to `connect_timeout` seconds.
    round_timeout : seconds to wait for the replies of a one-off exchange (`start` sets it to its `timeout`).
    discovery : "all" (ask every node its partition before round 1, and every newcomer) or "on-demand" (ask only
        the nodes a round samples: `Roster.locate`; start-up then does not grow with the number of clients).
    discovery_batch : on demand, how many not-yet-asked nodes one query.info batch asks when no hint names the
        node of a sampled partition (a deployment).
    """

    name = "fedavg"
    message_type = "train"
    config_keys: frozenset[str] = frozenset({"sparse.mask-layers"})

    def __init__(self, *, maskable: Sequence[str], num_clients: int | None = None, fraction_train: float = 1.0,
                 lr: float = 0.05, lr_decay: float = 1.0, aggregation: str = "mean", trim_fraction: float = 0.1,
                 max_update_norm_ratio: float = 50.0, seed: int = 0, max_examples: int | None = None,
                 min_available_nodes: int = 1, connect_timeout: float = 120.0, round_timeout: float = 900.0,
                 discovery: str = "all", discovery_batch: int = 64) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        if lr <= 0 or not 0.0 < lr_decay <= 1.0:
            raise ValueError(f"lr must be > 0 and lr_decay in (0, 1], got {lr}, {lr_decay}")
        if discovery not in DISCOVERY_MODES or discovery_batch < 1:
            raise ValueError(f"discovery must be one of {', '.join(DISCOVERY_MODES)} and discovery_batch >= 1, got "
                             f"{discovery!r}, {discovery_batch}")
        if num_clients is not None and num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if max_update_norm_ratio < 0 or not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"max_update_norm_ratio must be >= 0 and trim_fraction in [0, 0.5), got "
                             f"{max_update_norm_ratio}, {trim_fraction}")
        super().__init__(fraction_train=fraction_train, min_train_nodes=1, min_available_nodes=min_available_nodes)
        # no federated evaluation (configure_evaluate sends nothing); set here, as Flower warns when it is passed
        self.fraction_evaluate, self.min_evaluate_nodes = 0.0, 0
        self.maskable = list(maskable)
        self.num_clients = num_clients
        self.lr, self.lr_decay = lr, lr_decay
        self.aggregation, self.trim_fraction = aggregation, trim_fraction
        self.max_update_norm_ratio = max_update_norm_ratio
        self.seed = seed
        self.max_examples = max_examples or MAX_EXAMPLES
        self.connect_timeout, self.round_timeout = connect_timeout, round_timeout
        self.layout: sparse.Layout | None = None  # fixed by the first model configure_train sees
        self.masks: sparse.Masks | None = None
        self.fingerprint = sparse.NO_MASK
        self.discovery, self.discovery_batch = discovery, discovery_batch
        self.roster = Roster()
        self.hint: list[int] | None = None  # node id of each partition, as the simulation engine registered them
        self.connected_once = False
        self.failures = Failures()
        self.plans: dict[int, RoundPlan] = {}

    @classmethod
    def from_config(cls, cfg: dict, maskable: list[str]) -> FedAvg:
        """The strategy a resolved run config asks for (`fedsparse.config.resolve`); `maskable` as in __init__."""
        return cls(maskable=maskable, **cls.config_arguments(cfg))

    @classmethod
    def config_arguments(cls, cfg: dict) -> dict:
        """The constructor's keyword arguments read from a resolved run config (subclasses add theirs)."""
        return {"num_clients": cfg["num-clients"], "fraction_train": cfg["fraction-train"], "lr": cfg["lr"],
                "lr_decay": cfg["lr-decay"], "aggregation": cfg["aggregation"],
                "trim_fraction": cfg["trim-fraction"], "max_update_norm_ratio": cfg["max-update-norm-ratio"],
                "seed": cfg["seed"], "min_available_nodes": cfg["min-clients"] or cfg["num-clients"],
                "connect_timeout": cfg["connect-timeout"], "round_timeout": cfg["round-timeout"],
                "discovery": cls.discovery_mode(cfg)}

    @classmethod
    def allows_on_demand_discovery(cls) -> bool:
        """Whether the strategy can run knowing only the nodes of the sampled partitions: it has no one-off
        exchanges (`prepare`), which talk to every known client (the masked strategies' mask and saliency)."""
        return cls.prepare is FedAvg.prepare

    @classmethod
    def discovery_mode(cls, cfg: dict) -> str:
        """The discovery a config asks for; its `discovery` key "auto" (the default) means "on-demand" for the
        standard experiment of a strategy that allows it, "all" otherwise (other experiments' hooks talk to every
        client)."""
        asked = cfg.get("discovery", "auto")
        if asked == "on-demand" and not cls.allows_on_demand_discovery():
            from fedsparse.config import ConfigError

            raise ConfigError(f"config key 'discovery': strategy {cls.name} has one-off exchanges with every client "
                              "(its mask, its saliency round), so it needs discovery=all (or auto)")
        standard = cfg.get("experiment", "standard") == "standard"
        if asked == "on-demand" and not standard:
            from fedsparse.config import ConfigError

            raise ConfigError(f"config key 'discovery': experiment {cfg['experiment']} has hooks that talk to every "
                              "client, so it needs discovery=all (or auto)")
        if asked != "auto":
            return asked
        return "on-demand" if cls.allows_on_demand_discovery() and standard else "all"

    # ---- settings a subclass changes
    @property
    def value_dtype(self) -> str:
        """The dtype the model values travel in."""
        return "float32"

    @property
    def density(self) -> float:
        """The share of maskable weights that travel (1 without a mask)."""
        return 1.0 if self.masks is None else sparse.density_of(self.masks)

    @property
    def known(self) -> dict[int, NodeInfo]:
        """Node id -> what it reported at discovery."""
        return self.roster.known

    # ---- Flower's hooks
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None):
        """Flower's `Strategy.start` (the rounds with central `evaluate_fn`); one-off exchanges wait `timeout` too."""
        self.round_timeout = timeout
        return super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                             train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info("%s: fraction_train %.2f, lr %g (x %g per round), aggregation %s, value dtype %s, density %.4f",
                 type(self).__name__, self.fraction_train, self.lr, self.lr_decay, self.aggregation,
                 self.value_dtype, self.density)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """The train messages of `server_round`: discover new nodes, run the one-off exchanges (`prepare`),
        sample the partitions seeded by (seed, round), and send each the global model (masked values + dense
        tensors in `value_dtype`) with the train config. `config`'s entries are added to the train config
        (the four entries fedsparse sets, server-round, lr, value-dtype and mask-fingerprint, take precedence)."""
        state = self.bind(arrays)
        self.discover(grid)
        sampled = sample_partitions(self.num_clients, self.fraction_train, self.seed, server_round)
        if self.discovery == "on-demand":
            self.locate(grid, sampled)
        state = self.prepare(grid, server_round, state)
        nodes = self.roster.partitions()
        picked = [p for p in sampled if p in nodes]
        content = self.train_content(server_round, state, config)
        messages = [Message(content, dst_node_id=nodes[p], message_type=self.message_type) for p in picked]
        self.plans[server_round] = RoundPlan(server_round, state, self.masks, self.fingerprint, messages,
                                             self.logical_bytes())
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global model from the valid replies of `server_round`, and the round's metrics: `train_loss`
        (example-weighted), `sent`, `accepted`, `logical_down` and `logical_up` (bytes of the payloads). The
        arrays are None when no update was accepted or the aggregate is not finite (the global model then stays
        as it was)."""
        if server_round not in self.plans:
            raise ValueError(f"aggregate_train of round {server_round}, which configure_train never prepared")
        plan = self.plans.pop(server_round)
        answers = sort_replies(plan.messages, list(replies), self.failures, self.round_timeout)
        self.note_client_errors(answers.errors)
        readable: list[tuple[int, ClientUpdate]] = []
        for reply in answers.replies:
            node_id = int(reply.metadata.src_node_id)
            try:
                readable.append((node_id, self.read_reply(reply, plan)))
            except ReplyError as err:
                self.failures.add(node_id, f"rejected reply: {err}", self.message_type)
        metrics = {"sent": len(plan.messages), "logical_down": plan.logical_down * len(plan.messages),
                   "logical_up": sum(u.logical_bytes for _, u in readable)}
        accepted = self.screen_norms(readable)
        failed = MetricRecord({"train_loss": float("nan"), "accepted": 0, **metrics})
        if not accepted:
            return None, failed
        accepted.sort(key=lambda u: u.partition_id)
        values, dense = sparse.gather(plan.global_state, self.layout, plan.masks)
        if values.numel():
            values = values + self.combine([(u.num_examples, u.values) for u in accepted])
        dense = dense + self.combine([(u.num_examples, u.dense) for u in accepted])
        if not (bool(torch.isfinite(values).all()) and bool(torch.isfinite(dense).all())):
            self.failures.add(0, f"round {server_round}: the aggregate of {len(accepted)} updates is not finite; "
                                 "the global model is kept", "aggregate")
            return None, failed
        n_total = sum(u.num_examples for u in accepted)
        loss = sum(u.num_examples * u.train_loss for u in accepted) / n_total
        state = sparse.scatter(values, dense, self.layout, plan.masks)
        return ArrayRecord(state), MetricRecord({"train_loss": loss, "accepted": len(accepted), **metrics})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        """No federated evaluation: fedsparse evaluates the global model centrally (`evaluate_fn`, evaluators)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (no federated evaluation)."""
        return None

    # ---- checkpoints
    def state_dict(self) -> dict:
        """What the strategy keeps across rounds, for a checkpoint (FedAvg keeps nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output (on resume, before the first resumed round)."""

    # ---- steps of the hooks
    def bind(self, arrays: ArrayRecord) -> sparse.State:
        """The global model as torch tensors; the first call fixes the layout (maskable / dense tensors)."""
        state = arrays.to_torch_state_dict()
        if self.layout is None:
            missing = sorted(set(self.maskable) - set(state))
            if missing:
                raise ValueError(f"maskable names not in the model: {', '.join(missing)}")
            self.layout = sparse.Layout.of(state, self.maskable)
            self.check_layout(self.layout)
        return state

    def check_layout(self, layout: sparse.Layout) -> None:
        """Refuse a model this strategy cannot run on (the masked strategies check the density)."""

    def discover(self, grid: Grid) -> dict[int, int]:
        """Wait for the first nodes once; with `discovery="all"` ask every new node its partition (query.info).
        {partition: node id} of the nodes known (on demand: those located so far, none before round 1)."""
        if not self.connected_once and not self.roster.known and not self.roster.dropped:
            wait_for_nodes(grid, self.min_available_nodes, self.connect_timeout)
            self.connected_once = True
            if self.num_clients is None:
                self.num_clients = len(list(grid.get_node_ids()))
        if self.discovery == "all":
            self.roster.discover(grid, self.num_clients, self.max_examples, self.failures, self.round_timeout)
        return self.roster.partitions()

    def locate(self, grid: Grid, partitions: Sequence[int]) -> dict[int, int]:
        """Learn the nodes of `partitions` asking only as many nodes as needed (`Roster.locate`, with the
        simulation engine's registration order as hint where there is one); {partition: node id} of those found."""
        if self.hint is None:
            self.hint = registration_order(grid, self.num_clients)
        query = InfoQuery(self.num_clients, self.max_examples, self.failures, self.round_timeout)
        return self.roster.locate(grid, partitions, query, self.hint, self.discovery_batch)

    def prepare(self, grid: Grid, server_round: int, state: sparse.State) -> sparse.State:
        """One-off work before `server_round` (none for FedAvg); returns the global model the round sends."""
        return state

    def send(self, grid: Grid, messages: list[Message]) -> Exchange:
        """A one-off exchange: send, wait `round_timeout`, record errors and missing replies in the failures."""
        return exchange(grid, messages, self.failures, self.round_timeout)

    def train_config(self, server_round: int, extra: ConfigRecord | None = None) -> ConfigRecord:
        """The train config of `server_round`: server-round, lr, value-dtype, mask-fingerprint, then `extra`'s
        other entries."""
        lr = self.lr * self.lr_decay ** (server_round - 1)
        config = ConfigRecord({"server-round": server_round, "lr": lr, "value-dtype": self.value_dtype,
                               "mask-fingerprint": self.fingerprint})
        for key, value in (extra or {}).items():
            if key not in config:
                config[key] = value
        return config

    def train_content(self, server_round: int, state: sparse.State, config: ConfigRecord | None = None
                      ) -> RecordDict:
        """What every client of the round receives: the masked values and dense tensors, and the train config."""
        values, dense = sparse.gather(state, self.layout, self.masks)
        return RecordDict({"arrays": transport.make_payload(values, dense, self.value_dtype),
                           "config": self.train_config(server_round, config)})

    def logical_bytes(self) -> int:
        """Logical bytes of one model payload (values x value bytes, no headers)."""
        return transport.logical_payload_bytes(self.layout, self.masks, self.value_dtype)

    def dense_round_bytes(self) -> int:
        """Serialized bytes one client moves (down + up) in a dense float32 FedAvg round of this model."""
        values, dense = sparse.gather({k: torch.zeros(s) for k, s in self.layout.shapes.items()}, self.layout, None)
        payload = transport.make_payload(values, dense, "float32").count_bytes()
        config = ConfigRecord({"server-round": 1, "lr": self.lr, "value-dtype": "float32",
                               "mask-fingerprint": sparse.NO_MASK})
        return 2 * payload + config.count_bytes()

    def read_reply(self, reply: Message, plan: RoundPlan) -> ClientUpdate:
        """The update in a train reply, after every field was checked; ReplyError says why it is not valid."""
        node = self.known.get(int(reply.metadata.src_node_id))
        fields = replies.read_train(reply.content, node, plan.server_round, plan.fingerprint)
        values, dense, logical = self.decode_payload(fields.arrays, plan)
        return ClientUpdate(fields.partition_id, fields.num_examples, fields.train_loss, values, dense, logical)

    def decode_payload(self, arrays: ArrayRecord, plan: RoundPlan) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(value update, dense update, logical bytes) carried by a reply's arrays; ReplyError if malformed."""
        values, dense = transport.read_payload(arrays, self.layout, plan.masks, self.value_dtype)
        return values, dense, transport.logical_payload_bytes(self.layout, plan.masks, self.value_dtype)

    def screen_norms(self, readable: list[tuple[int, ClientUpdate]]) -> list[ClientUpdate]:
        """Reject the updates whose L2 norm (float64) exceeds `max_update_norm_ratio` x the lower median norm of
        the round's readable updates (the lower median: with two replies, the smaller one is the reference)."""
        ratio = self.max_update_norm_ratio
        if ratio == 0 or len(readable) < 2:
            return [u for _, u in readable]
        norms = [math.sqrt(float(u.values.double().square().sum() + u.dense.double().square().sum()))
                 for _, u in readable]
        reference = sorted(norms)[(len(norms) - 1) // 2]
        kept = []
        for (node_id, update), norm in zip(readable, norms, strict=True):
            if norm > ratio * reference:
                self.failures.add(node_id, f"rejected reply: update norm {norm:.4g} exceeds {ratio:g} x the "
                                           f"round's median norm {reference:.4g}", self.message_type)
            else:
                kept.append(update)
        return kept

    def combine(self, parts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """The aggregate of (num-examples, update) pairs, sorted by partition: the example-weighted mean, the
        coordinate-wise median or the trimmed mean (the last two unweighted)."""
        if self.aggregation == "median":
            return coordinate_median([v for _, v in parts])
        if self.aggregation == "trimmed-mean":
            return trimmed_mean([v for _, v in parts], self.trim_fraction)
        return weighted_mean([(n, v) for n, v in parts])

    def note_client_errors(self, errors: dict[int, str]) -> None:
        """Error replies of the last train exchange (node id -> reason); the masked strategies re-install."""
