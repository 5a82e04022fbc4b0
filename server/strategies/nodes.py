"""The clients a strategy talks to: discovery (`query.info`), seeded sampling, and one exchange through a Grid with
every error and missing reply recorded.

Two ways to learn which node holds which partition (node ids are random 64-bit ints; only a node knows its
`partition-id`, so the server asks it with query.info and checks the claim):
- `Roster.discover`: ask every connected node not asked yet (the experiments whose hooks talk to every client, and
  the masked strategies, whose mask goes to every client, need the whole roster).
- `Roster.locate`: ask only the nodes that hold the partitions a round samples (discovery on demand). Sampling
  stays by partition id, seeded by (seed, round) (`sample_partitions`), so it is reproducible and a resumed run
  (which, in simulation, has new node ids) samples the same clients. To find a partition's node without asking
  everyone, `locate` first asks the node a hint names (`registration_order`: Flower's simulation engine registers
  the node of partition i as the i-th node of its in-memory link state), then, for partitions still missing
  (no hint, as in a deployment; a hinted node that claims another partition; a holder that left), it asks the
  not-yet-asked connected nodes in batches of `batch_size`, in sorted node-id order, until every wanted partition
  is found or every node was asked. A hint is only a guess: every claim is read from the node's own reply and
  checked exactly as in `discover`, so a wrong hint costs extra queries, never a wrong mapping.

Invariants:
- A node id is in at most one of `Roster.known` / `Roster.dropped`; a dropped node is never asked again, and no
  node is asked twice (asked = known | dropped).
- No two known nodes hold the same partition: a node claiming a partition another connected node holds is
  dropped; a node claiming the partition of a node that left takes it over (a restarted node with a new id).
- `Failures` records every node the server gives up on, with its id, the reason and the message type: nothing
  vanishes silently. The records are the dicts summary.json lists ({"node_id", "reason", "message"}; the runner
  adds "round").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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

    def asked(self) -> set[int]:
        """Every node id asked for its partition so far (known or dropped)."""
        return set(self.known) | self.dropped

    def discover(self, grid, num_clients: int, max_examples: int, failures: Failures, timeout: float) -> None:
        """Ask every connected node not asked yet for its partition and example count (query.info).

        A reply is read through `fedsparse.replies.read_info`. A partition claimed by a node still connected is
        kept by that node; a partition whose node left is taken over by the newcomer (a restarted SuperNode with a
        new node id). Raises RuntimeError when no node is known afterwards."""
        connected = {int(n) for n in grid.get_node_ids()}
        new = sorted(connected - self.asked())
        if not new:
            return
        self.ask(grid, new, connected, num_clients, max_examples, failures, timeout)
        log.info("%d clients: partitions %s", len(self.known), sorted(self.partitions()))

    def locate(self, grid, wanted: Sequence[int], query: InfoQuery, hint: Sequence[int] | None = None,
               batch_size: int = 64) -> dict[int, int]:
        """Make sure the nodes holding the `wanted` partitions are known, asking as few nodes as possible (module
        docstring); returns {partition id: node id} of the wanted partitions found (a partition no connected node
        holds, or whose node failed to answer, is missing: its failure is recorded when a node failed).

        `hint[p]` is the node id believed to hold partition p (None: no hint). Raises RuntimeError when nodes were
        asked and still no node is known."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        connected = {int(n) for n in grid.get_node_ids()}

        def missing() -> list[int]:
            held = self.partitions()
            return [p for p in wanted if held.get(p) not in connected]

        asked_any = False
        gave_up: set[int] = set()  # partitions whose hinted node was asked and failed: it is their holder
        if hint is not None:
            guesses = {p: int(hint[p]) for p in missing() if 0 <= p < len(hint)}
            to_ask = sorted({n for n in guesses.values() if n in connected and n not in self.asked()})
            if to_ask:
                asked_any = True
                self.ask(grid, to_ask, connected, query.num_clients, query.max_examples, query.failures,
                         query.timeout)
                gave_up = {p for p, n in guesses.items() if n in self.dropped}
        while True:
            still = [p for p in missing() if p not in gave_up]
            candidates = sorted(connected - self.asked())
            if not still or not candidates:
                break
            batch = candidates[:max(batch_size, len(still))]
            asked_any = True
            self.ask(grid, batch, connected, query.num_clients, query.max_examples, query.failures, query.timeout)
        if asked_any and not self.known:
            reasons = "; ".join(f["reason"][:300] for f in query.failures.records[-3:])
            raise RuntimeError(f"none of the clients asked answered; last errors: {reasons}")
        lost = missing()
        if lost:
            log.info("partitions %s: no connected node holds them (or their node failed); the round goes on "
                     "without them", lost)
        held = self.partitions()
        return {p: held[p] for p in wanted if p in held and p not in lost}

    def ask(self, grid, node_ids: list[int], connected: set[int], num_clients: int, max_examples: int,
            failures: Failures, timeout: float) -> None:
        """Send query.info to `node_ids` (none asked before) and file every answer: a valid claim makes the node
        known (taking over the partition of a node that left), anything else drops it with the reason recorded.
        Raises RuntimeError when no node is known afterwards."""
        messages = [Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in node_ids]
        answers = exchange(grid, messages, failures, timeout)
        self.dropped.update(node_ids)  # until a valid claim below moves a node to `known`
        claims: list[tuple[int, NodeInfo]] = []
        for reply in answers.replies:
            node_id = int(reply.metadata.src_node_id)
            try:
                claims.append((node_id, replies.read_info(reply.content, num_clients, max_examples)))
            except ReplyError as err:
                failures.add(node_id, f"dropped node: {err}", "query.info")
        holders = self.partitions()
        for node_id, info in sorted(claims):
            holder = holders.get(info.partition_id)
            if holder is not None and holder in connected:
                failures.add(node_id, f"dropped node: it claims partition {info.partition_id}, already held by "
                                      f"node {holder}", "query.info")
                continue
            if holder is not None:
                log.info("node %s takes over partition %d from node %s, which left", node_id, info.partition_id,
                         holder)
                del self.known[holder]
            self.known[node_id] = info
            holders[info.partition_id] = node_id
            self.dropped.discard(node_id)
        if not self.known:
            reasons = "; ".join(f["reason"][:300] for f in failures.records[-3:])
            raise RuntimeError(f"none of the {len(node_ids)} clients answered; last errors: {reasons}")


@dataclass(frozen=True)
class InfoQuery:
    """How query.info replies are read and waited for: the partition ids a claim may name (0 .. num_clients-1),
    the most examples a node may report, where failures go, and the seconds to wait for the replies."""

    num_clients: int
    max_examples: int
    failures: Failures
    timeout: float


def registration_order(grid, num_clients: int) -> list[int] | None:
    """The node ids of Flower's simulation engine in the order it registered them, which is partition order
    (`flwr.server.superlink.fleet.vce.vce_api._register_nodes` gives the i-th node `partition-id` i; the in-memory
    link state keeps its nodes in insertion order); None when `grid` (or the grid a wrapper such as `CountingGrid`
    holds in `.grid`) is not an in-memory simulation grid, or it does not hold exactly `num_clients` nodes. Only a
    hint: `Roster.locate` checks every claim."""
    inner = grid
    while not hasattr(inner, "state") and hasattr(inner, "grid"):
        inner = inner.grid
    node_info = getattr(getattr(inner, "state", None), "get_node_info", None)
    if node_info is None:
        return None
    try:
        order = [int(info.node_id) for info in node_info()]
    except Exception as err:  # noqa: BLE001  (a Flower internal: any failure only means "no hint")
        log.debug("no registration-order hint: %s", err)
        return None
    return order if len(order) == num_clients else None


def sample_partitions(num_clients: int, fraction: float, seed: int, server_round: int) -> list[int]:
    """Partition ids trained in a round: seeded by (seed, round), so a resumed run samples the same ones."""
    k = max(1, round(fraction * num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))
