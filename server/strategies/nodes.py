"""The clients a strategy talks to: discovery (`query.info`), seeded sampling, and one exchange through a Grid with
every error and missing reply recorded.

Invariants:
- A node id is in at most one of `Roster.known` / `Roster.dropped`; a dropped node is never asked again.
- `Failures` records every node the server gives up on, with its id, the reason and the message type: nothing
  vanishes silently. The records are the dicts summary.json lists ({"node_id", "reason", "message"}; the runner
  adds "round").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, RecordDict

from fedsparse import replies
from fedsparse.replies import NodeInfo, ReplyError

log = logging.getLogger("fedsparse")


@dataclass
class Failures:
    """The failures a strategy recorded: rejected, erroneous and missing replies, dropped nodes."""

    records: list[dict] = field(default_factory=list)

    def add(self, node_id: int, reason: str, what: str) -> None:
        """Log a failure with the node id and the reason, and record it."""
        log.warning("node %s: %s (%s)", node_id, reason, what)
        self.records.append({"node_id": int(node_id), "reason": reason, "message": what})

    def take(self) -> list[dict]:
        """The failures recorded since the last take (and forget them)."""
        taken, self.records = self.records, []
        return taken


@dataclass(frozen=True)
class Exchange:
    """The replies of one send: the ones with content (in the order received) and the error replies' reasons
    by node id."""

    replies: list[Message]
    errors: dict[int, str]


def sort_replies(messages: list[Message], received: list[Message], failures: Failures, timeout: float) -> Exchange:
    """Split the replies to `messages` into content and errors; record every error and every missing reply.

    The grid gave each instruction its message id and a reply names the one it answers; the SuperLink's own error
    replies (a node that stopped heartbeating) come from the SuperLink's node id, so the instruction says whose
    they are."""
    destination = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages if m.metadata.message_id}
    ok, errors, answered = [], {}, set()
    for reply in received:
        node_id = destination.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
        answered.add(node_id)
        if reply.has_error():
            errors[node_id] = str(reply.error.reason)
            failures.add(node_id, f"client error: {reply.error.reason}", reply.metadata.message_type)
        else:
            ok.append(reply)
    for message in messages:
        if int(message.metadata.dst_node_id) not in answered:
            # Flower also drops a reply it cannot store (expired TTL, a reply not linked to its instruction, a
            # node that left): the server only sees it missing when the timeout ends.
            failures.add(message.metadata.dst_node_id, f"no reply within round-timeout ({timeout:.0f} s)",
                         message.metadata.message_type)
    return Exchange(ok, errors)


def exchange(grid, messages: list[Message], failures: Failures, timeout: float) -> Exchange:
    """Send `messages` through `grid` and sort the replies (see `sort_replies`)."""
    if not messages:
        return Exchange([], {})
    received = list(grid.send_and_receive(messages, timeout=timeout))
    return sort_replies(messages, received, failures, timeout)


def wait_for_nodes(grid, wanted: int, timeout: float) -> None:
    """Wait up to `timeout` seconds for `wanted` nodes to connect; RuntimeError says how many did."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {wanted} clients connected within "
                               f"connect-timeout ({timeout:.0f} s): start more SuperNodes "
                               "(flwr run: num-supernodes = num-clients) or lower min-clients")
        time.sleep(0.5)


@dataclass
class Roster:
    """The nodes the server knows (node id -> what it reported at discovery) and the node ids it dropped: a node
    whose query.info reply was missing, malformed, or claimed a partition another connected node holds."""

    known: dict[int, NodeInfo] = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)

    def partitions(self) -> dict[int, int]:
        """{partition id: node id} of the known nodes."""
        return {info.partition_id: node_id for node_id, info in self.known.items()}

    def discover(self, grid, num_clients: int, max_examples: int, failures: Failures, timeout: float) -> None:
        """Ask every connected node not listed yet for its partition and example count (query.info).

        A reply is read through `fedsparse.replies.read_info`. A partition claimed by a node still connected is
        kept by that node; a partition whose node left is taken over by the newcomer (a restarted SuperNode with a
        new node id). Raises RuntimeError when no node is known afterwards."""
        connected = {int(n) for n in grid.get_node_ids()}
        new = sorted(connected - set(self.known) - self.dropped)
        if not new:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in new]
        answers = exchange(grid, messages, failures, timeout)
        self.dropped.update(new)  # until a valid claim below moves a node to `known`
        claims: list[tuple[int, NodeInfo]] = []
        for reply in answers.replies:
            node_id = int(reply.metadata.src_node_id)
            try:
                claims.append((node_id, replies.read_info(reply.content, num_clients, max_examples)))
            except ReplyError as err:
                failures.add(node_id, f"dropped node: {err}", "query.info")
        for node_id, info in sorted(claims):
            holder = self.partitions().get(info.partition_id)
            if holder is not None and holder in connected:
                failures.add(node_id, f"dropped node: it claims partition {info.partition_id}, already held by "
                                      f"node {holder}", "query.info")
                continue
            if holder is not None:
                log.info("node %s takes over partition %d from node %s, which left", node_id, info.partition_id,
                         holder)
                del self.known[holder]
            self.known[node_id] = info
            self.dropped.discard(node_id)
        if not self.known:
            reasons = "; ".join(f["reason"][:300] for f in failures.records[-3:])
            raise RuntimeError(f"none of the {len(new)} clients answered; last errors: {reasons}")
        log.info("%d clients: partitions %s", len(self.known), sorted(self.partitions()))


def sample_partitions(num_clients: int, fraction: float, seed: int, server_round: int) -> list[int]:
    """Partition ids trained in a round: seeded by (seed, round), so a resumed run samples the same ones."""
    k = max(1, round(fraction * num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))
