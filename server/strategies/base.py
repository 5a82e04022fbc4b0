"""What every strategy shares: the channel that counts bytes, and dense FedAvg, whose hooks the others override.

The hooks follow Flower's own strategies, one job each: `setup` (one-off exchanges before a round: saliency,
mask install), `configure_train` (the messages of a round), `read_reply` (check one reply, raise ReplyError),
`aggregate_train` (the new global model). The round loop in `server/loop.py` calls them.

Every reply is read through `fedsparse.replies` (one validation path); a reply that fails it is rejected, logged
with its node id and reason and recorded in `Channel.failures`, and the round goes on with the others. What is
aggregated is bounded: a client's weight is at most the example count it reported at discovery (`known`), an
update whose norm exceeds `max-update-norm-ratio` x the round's median update norm is rejected, and a non-finite
aggregate is never returned (the round then counts as failed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedsparse import replies, sparse, transport
from fedsparse.replies import NodeInfo
from fedsparse.sparse import coordinate_median, trimmed_mean, weighted_mean
from fedsparse.transport import ReplyError

log = logging.getLogger("fedsparse")


@dataclass
class Traffic:
    """Bytes that crossed the wire, per direction: serialized (count_bytes of every record) and logical."""

    down: int = 0
    up: int = 0
    logical_down: int = 0
    logical_up: int = 0

    def add(self, other: Traffic) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class Channel:
    """Sends messages through the Flower grid and counts every byte of every message and reply."""

    grid: object
    timeout: float
    traffic: Traffic = field(default_factory=Traffic)
    failures: list[dict] = field(default_factory=list)
    client_errors: dict[int, str] = field(default_factory=dict)  # node id -> error reason, of the last send

    def send(self, messages: list[Message], logical_down: int = 0) -> list[Message]:
        """Send; return the replies that are not errors (errors and missing replies are logged and recorded,
        and the error replies of this send are kept in `client_errors`)."""
        self.client_errors = {}
        if not messages:
            return []
        for m in messages:
            self.traffic.down += transport.content_bytes(m.content)
        self.traffic.logical_down += logical_down * len(messages)
        received = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        # The grid set each instruction's message id; a reply names it. The SuperLink's own error replies (a node
        # that stopped heartbeating) come from the SuperLink's node id, so the instruction says whose they are.
        destination = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages if m.metadata.message_id}
        ok, answered = [], set()
        for r in received:
            node_id = destination.get(r.metadata.reply_to_message_id, int(r.metadata.src_node_id))
            answered.add(node_id)
            if r.has_error():
                self.client_errors[node_id] = str(r.error.reason)
                self.fail(node_id, f"client error: {r.error.reason}", r.metadata.message_type)
            else:
                self.traffic.up += transport.content_bytes(r.content)
                ok.append(r)
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                # Flower also drops a reply it cannot store (expired TTL, a reply not linked to its instruction,
                # a node that left): the server only sees it missing when the timeout ends.
                self.fail(m.metadata.dst_node_id, f"no reply within round-timeout ({self.timeout:.0f} s)",
                          m.metadata.message_type)
        return ok

    def take(self) -> Traffic:
        """The traffic counted since the last take, and start counting afresh."""
        taken, self.traffic = self.traffic, Traffic()
        return taken

    def fail(self, node_id: int, reason: str, what: str) -> None:
        """Log a failure with the node id and reason, and record it (it ends up in summary.json)."""
        log.warning("node %s: %s (%s)", node_id, reason, what)
        self.failures.append({"node_id": int(node_id), "reason": reason, "message": what})


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted train reply: its partition, weight, loss and the decoded float32 updates."""

    partition_id: int
    num_examples: int
    train_loss: float
    values: torch.Tensor
    dense: torch.Tensor


class FedAvg:
    """Dense FedAvg: the whole model travels as float32 both ways; the global model moves by the
    example-weighted mean of the clients' updates (= the weighted mean of their models)."""

    name = "fedavg"

    def __init__(self, cfg: dict, layout: sparse.Layout) -> None:
        self.cfg = cfg
        self.layout = layout
        self.masks: sparse.Masks | None = None
        self.fingerprint = sparse.NO_MASK
        self.global_state: sparse.State = {}  # the model sent this round; replies are updates to it
        self.known: dict[int, NodeInfo] = {}  # node id -> what it reported at discovery (set by the loop)
        self.server_round = 0  # the round configure_train last prepared; train replies must echo it

    # ---- settings a subclass changes
    @property
    def value_dtype(self) -> str:
        return "float32"

    @property
    def density(self) -> float:
        return 1.0 if self.masks is None else sparse.density_of(self.masks)

    # ---- hooks
    def setup(self, channel: Channel, nodes: dict[int, int], state: sparse.State, server_round: int
              ) -> sparse.State:
        """One-off work before `server_round`; returns the (possibly masked) global model."""
        return state

    def train_config(self, server_round: int) -> ConfigRecord:
        lr = self.cfg["lr"] * self.cfg["lr-decay"] ** (server_round - 1)
        return ConfigRecord({"server-round": server_round, "lr": lr, "value-dtype": self.value_dtype,
                             "mask-fingerprint": self.fingerprint})

    def configure_train(self, server_round: int, state: sparse.State, node_ids: list[int]) -> list[Message]:
        """The train messages of `server_round`: the global model (masked values + dense) and the config."""
        self.global_state = state
        self.server_round = server_round
        values, dense = sparse.gather(state, self.layout, self.masks)
        content = RecordDict({"arrays": transport.make_payload(values, dense, self.value_dtype),
                              "config": self.train_config(server_round)})
        return [Message(content, dst_node_id=n, message_type="train") for n in node_ids]

    def logical_bytes(self) -> int:
        return transport.logical_payload_bytes(self.layout, self.masks, self.value_dtype)

    def read_reply(self, reply: Message) -> ClientUpdate:
        """The update in a train reply, after every field was checked; ReplyError says why it is not valid."""
        node = self.known.get(int(reply.metadata.src_node_id))
        fields = replies.read_train(reply.content, node, self.server_round, self.fingerprint)
        values, dense = self.decode_payload(fields.arrays)
        return ClientUpdate(fields.partition_id, fields.num_examples, fields.train_loss, values, dense)

    def decode_payload(self, arrays: ArrayRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """(value update, dense update) carried by a reply's arrays; ReplyError if they are malformed."""
        return transport.read_payload(arrays, self.layout, self.masks, self.value_dtype)

    def aggregate_train(self, server_round: int, replies: list[Message], channel: Channel
                        ) -> tuple[sparse.State | None, dict]:
        """Global model plus the aggregate (`aggregation`) of the valid updates; None when no update was
        accepted or the aggregate is not finite (the global model must then stay as it was)."""
        readable: list[tuple[int, ClientUpdate]] = []
        for r in replies:
            node_id = int(r.metadata.src_node_id)
            try:
                readable.append((node_id, self.read_reply(r)))
            except ReplyError as err:
                channel.fail(node_id, f"rejected reply: {err}", "train")
        channel.traffic.logical_up += self.logical_bytes() * len(readable)
        accepted = self.screen_norms(readable, channel)
        if not accepted:
            return None, {"train_loss": float("nan"), "accepted": 0}
        accepted.sort(key=lambda u: u.partition_id)
        values, dense = sparse.gather(self.global_state, self.layout, self.masks)
        if values.numel():
            values = values + self.combine([(u.num_examples, u.values) for u in accepted])
        dense = dense + self.combine([(u.num_examples, u.dense) for u in accepted])
        if not (bool(torch.isfinite(values).all()) and bool(torch.isfinite(dense).all())):
            channel.fail(0, f"round {server_round}: the aggregate of {len(accepted)} updates is not finite; "
                            "the global model is kept", "aggregate")
            return None, {"train_loss": float("nan"), "accepted": 0}
        n_total = sum(u.num_examples for u in accepted)
        loss = sum(u.num_examples * u.train_loss for u in accepted) / n_total
        return sparse.scatter(values, dense, self.layout, self.masks), {"train_loss": loss,
                                                                         "accepted": len(accepted)}

    def screen_norms(self, readable: list[tuple[int, ClientUpdate]], channel: Channel) -> list[ClientUpdate]:
        """Reject the updates whose L2 norm (float64) exceeds `max-update-norm-ratio` x the lower median norm
        of the round's readable updates (the lower median: with two replies, the smaller one is the reference)."""
        ratio = self.cfg["max-update-norm-ratio"]
        if ratio == 0 or len(readable) < 2:
            return [u for _, u in readable]
        norms = [math.sqrt(float(u.values.double().square().sum() + u.dense.double().square().sum()))
                 for _, u in readable]
        reference = sorted(norms)[(len(norms) - 1) // 2]
        kept = []
        for (node_id, update), norm in zip(readable, norms, strict=True):
            if norm > ratio * reference:
                channel.fail(node_id, f"rejected reply: update norm {norm:.4g} exceeds {ratio:g} x the round's "
                                      f"median norm {reference:.4g}", "train")
            else:
                kept.append(update)
        return kept

    def combine(self, parts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """The aggregate of (num-examples, update) pairs, sorted by partition: `aggregation` picks the
        example-weighted mean, the coordinate-wise median or the trimmed mean (the last two unweighted)."""
        method = self.cfg["aggregation"]
        if method == "median":
            return coordinate_median([v for _, v in parts])
        if method == "trimmed-mean":
            return trimmed_mean([v for _, v in parts], self.cfg["trim-fraction"])
        return weighted_mean([(n, v) for n, v in parts])

    def note_client_errors(self, errors: dict[int, str]) -> None:
        """Error replies of the last train exchange (node id -> reason); the masked strategies re-install."""

    # ---- checkpointing
    def checkpoint(self) -> dict:
        return {}

    def restore(self, ckpt: dict) -> None:
        pass


def sample_partitions(num_clients: int, fraction: float, seed: int, server_round: int) -> list[int]:
    """Partition ids trained in a round: seeded by (seed, round), so a resumed run samples the same ones."""
    k = max(1, round(fraction * num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))
