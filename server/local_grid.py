"""`LocalGrid`: a Flower Grid whose nodes run fedsparse's real ClientApp in this process, without Ray or gRPC.

For benchmarks that repeat a run many times (Ray's start-up would dominate) and for tests that need to see or
steer every message. Each node has its own Flower `Context` (its `state` survives between messages, as on a
SuperNode) and partition id; a message is handled by `client.client_app`'s app exactly as a simulated or deployed
node handles it (handlers, client-state snapshots on disk). A handler's exception becomes an error reply, as in
Flower; the runner and the strategies then treat it as they treat a failed node.

Invariants: messages are handled one after another, in the order given, so a run is deterministic; `delivered`
records (message type, partition id) of every message handled; node ids are `first_node_id + partition id`.
Subclasses steer delivery by overriding `deliver` (drop a message, fail it, stop the run).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict


class LocalGrid:
    """`num_nodes` in-process nodes (partitions 0 .. num_nodes - 1) running the real ClientApp (module docstring)."""

    def __init__(self, cfg: dict, num_nodes: int | None = None, *, first_node_id: int = 100) -> None:
        from client.client_app import build_app

        count = cfg["num-clients"] if num_nodes is None else num_nodes
        self.app = build_app()
        self.contexts = {first_node_id + p: Context(run_id=1, node_id=first_node_id + p, state=RecordDict(),
                                                    run_config=cfg,
                                                    node_config={"partition-id": p, "num-partitions": count})
                         for p in range(count)}
        self.first_node_id = first_node_id
        self.delivered: list[tuple[str, int]] = []

    def partition(self, node_id: int) -> int:
        """The partition id of a node."""
        return node_id - self.first_node_id

    def get_node_ids(self) -> list[int]:
        """Every node, always connected."""
        return list(self.contexts)

    def deliver(self, message: Message) -> Message | None:
        """Handle one message at its node: the reply, or an error reply if the handler raised (None: no reply)."""
        self.delivered.append((message.metadata.message_type, self.partition(message.metadata.dst_node_id)))
        try:
            return self.app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as err:  # noqa: BLE001  (as Flower: a client exception is an error reply)
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        """Every message handled by its node, in order; the replies."""
        return [reply for reply in map(self.deliver, messages) if reply is not None]
