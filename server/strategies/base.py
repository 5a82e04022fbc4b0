"""What every strategy shares: the channel that counts bytes, and dense FedAvg, whose hooks the others override.

The hooks follow Flower's own strategies, one job each: `setup` (one-off exchanges before a round: saliency,
mask install), `configure_train` (the messages of a round), `read_reply` (check one reply, raise ReplyError),
`aggregate_train` (the new global model). The round loop in `server/loop.py` calls them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedsparse import sparse, transport
from fedsparse.sparse import weighted_mean
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

    def send(self, messages: list[Message], logical_down: int = 0) -> list[Message]:
        """Send; return the replies that are not errors (errors are logged and recorded)."""
        for m in messages:
            self.traffic.down += transport.content_bytes(m.content)
        self.traffic.logical_down += logical_down * len(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        ok = []
        for r in replies:
            if r.has_error():
                self.fail(r.metadata.src_node_id, f"client error: {r.error.reason}", r.metadata.message_type)
            else:
                self.traffic.up += transport.content_bytes(r.content)
                ok.append(r)
        answered = {r.metadata.src_node_id for r in replies}
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.fail(m.metadata.dst_node_id, "no reply before the timeout", m.metadata.message_type)
        return ok

    def take(self) -> Traffic:
        """The traffic counted since the last take, and start counting afresh."""
        taken, self.traffic = self.traffic, Traffic()
        return taken

    def fail(self, node_id: int, reason: str, what: str) -> None:
        log.warning("node %s: %s (%s)", node_id, reason, what)
        self.failures.append({"node_id": int(node_id), "reason": reason, "message": what})


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
        self.global_state = state
        values, dense = sparse.gather(state, self.layout, self.masks)
        content = RecordDict({"arrays": transport.make_payload(values, dense, self.value_dtype),
                              "config": self.train_config(server_round)})
        return [Message(content, dst_node_id=n, message_type="train") for n in node_ids]

    def logical_bytes(self) -> int:
        return transport.logical_payload_bytes(self.layout, self.masks, self.value_dtype)

    def read_reply(self, reply: Message) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(num-examples, value update, dense update) of a valid train reply."""
        content = reply.content
        for key in ("arrays", "metrics"):
            if key not in content:
                raise ReplyError(f"reply lacks the record '{key}'")
        n = content["metrics"].get("num-examples")
        if not isinstance(n, int) or n <= 0:
            raise ReplyError(f"num-examples must be a positive integer, got {n!r}")
        got_fp = str(content["config"].get("mask-fingerprint", "")) if "config" in content else "(none)"
        if got_fp != self.fingerprint:
            raise ReplyError(f"mask fingerprint {got_fp!r} is not the current mask's {self.fingerprint!r}")
        values, dense = self.decode_payload(content["arrays"])
        return n, values, dense

    def decode_payload(self, arrays: ArrayRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """(value update, dense update) carried by a reply's arrays; ReplyError if they are malformed."""
        return transport.read_payload(arrays, self.layout, self.masks, self.value_dtype)

    def aggregate_train(self, server_round: int, replies: list[Message], channel: Channel
                        ) -> tuple[sparse.State | None, dict]:
        """Global model plus the weighted mean of the valid updates; None when every reply was rejected."""
        accepted = []
        for r in replies:
            try:
                n, values, dense = self.read_reply(r)
            except ReplyError as err:
                channel.fail(r.metadata.src_node_id, f"rejected reply: {err}", "train")
                continue
            pid = int(r.content["metrics"].get("partition-id", -1))
            loss = float(r.content["metrics"].get("train-loss", float("nan")))
            accepted.append((pid, n, values, dense, loss))
        channel.traffic.logical_up += self.logical_bytes() * len(accepted)
        if not accepted:
            return None, {"train_loss": float("nan"), "accepted": 0}
        accepted.sort(key=lambda a: a[0])
        values, dense = sparse.gather(self.global_state, self.layout, self.masks)
        if values.numel():
            values = values + weighted_mean([(n, v) for _, n, v, _, _ in accepted])
        dense = dense + weighted_mean([(n, d) for _, n, _, d, _ in accepted])
        n_total = sum(a[1] for a in accepted)
        loss = sum(a[1] * a[4] for a in accepted) / n_total
        return sparse.scatter(values, dense, self.layout, self.masks), {"train_loss": loss,
                                                                         "accepted": len(accepted)}

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
