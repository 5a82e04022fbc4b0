"""`CountingGrid`: a Flower Grid that counts the serialized bytes of every message it carries.

Wrap any Grid (`CountingGrid(grid)`) and pass the wrapper wherever a Grid goes: to `Strategy.start`, to the
fedsparse runner, to a strategy's `configure_train`. Every instruction pushed through it adds its content's
serialized size (`fedsparse.transport.content_bytes`: Flower's `count_bytes()` of each record) to `down` of its
message type; every reply pulled through it that is not an error adds its content's size to `up` of the type of
the instruction it answers. An error reply carries no content and counts nothing.

Message types starting with `query.` (discovery, saliency, mask install, ...) are one-off traffic; every other
type (`train`, `train.topk`, ...) is round traffic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

from fedsparse import transport

ONE_OFF_PREFIX = "query."


@dataclass
class Bytes:
    """Serialized bytes down (server to clients) and up (clients to server)."""

    down: int = 0
    up: int = 0

    def __add__(self, other: Bytes) -> Bytes:
        """Both directions summed."""
        return Bytes(self.down + other.down, self.up + other.up)

    def __sub__(self, other: Bytes) -> Bytes:
        """What was counted between two readings (later - earlier)."""
        return Bytes(self.down - other.down, self.up - other.up)

    @property
    def total(self) -> int:
        """Down + up."""
        return self.down + self.up


def is_one_off(message_type: str) -> bool:
    """Whether messages of this type are one-off traffic (`query.*`) rather than round traffic."""
    return message_type.startswith(ONE_OFF_PREFIX)


def counted_bytes(grid: object, message_type: str) -> Bytes:
    """Bytes a counting grid has carried so far for `message_type` (none for a grid that does not count): a hook
    that wants the cost of its own exchange reads this before and after it."""
    counted = getattr(grid, "by_type", {}).get(message_type)
    return Bytes() if counted is None else Bytes(counted.down, counted.up)


class CountingGrid(Grid):
    """A Grid that forwards everything to `grid` and counts serialized bytes per direction and message type."""

    def __init__(self, grid: Grid) -> None:
        if isinstance(grid, CountingGrid):
            raise TypeError("the grid is already a CountingGrid: wrapping it twice would count every byte twice")
        self.grid = grid
        self.by_type: dict[str, Bytes] = {}
        self._sent_type: dict[str, str] = {}  # message id of an instruction -> its message type

    # ---- what is counted
    def rounds(self) -> Bytes:
        """Bytes of round traffic (every type but `query.*`) so far."""
        return sum((b for t, b in self.by_type.items() if not is_one_off(t)), Bytes())

    def one_off(self) -> Bytes:
        """Bytes of one-off traffic (`query.*`) so far."""
        return sum((b for t, b in self.by_type.items() if is_one_off(t)), Bytes())

    def _count(self, message_type: str, down: int = 0, up: int = 0) -> None:
        counted = self.by_type.setdefault(message_type, Bytes())
        counted.down += down
        counted.up += up

    def _count_replies(self, replies: Iterable[Message]) -> list[Message]:
        received = list(replies)
        for reply in received:
            if reply.has_error():
                continue
            message_type = self._sent_type.get(reply.metadata.reply_to_message_id, reply.metadata.message_type)
            self._count(message_type, up=transport.content_bytes(reply.content))
        return received

    # ---- Grid
    def set_run(self, run) -> None:
        """Forwarded to the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self):
        """The wrapped grid's run."""
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        """Forwarded to the wrapped grid (deprecated in Flower: build `Message(...)` instead)."""
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """The node ids of the wrapped grid."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Count each instruction's content as `down` of its type, then push it."""
        messages = list(messages)
        for message in messages:
            self._count(message.metadata.message_type, down=transport.content_bytes(message.content))
        ids = list(self.grid.push_messages(messages))
        for message, message_id in zip(messages, ids, strict=False):
            self._sent_type[message_id] = message.metadata.message_type
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies and count each non-error one as `up` of its instruction's type."""
        return self._count_replies(self.grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Count the instructions, send them through the wrapped grid, count the replies (nothing to send: no
        replies, at once)."""
        messages = list(messages)
        if not messages:
            return []
        for message in messages:
            self._count(message.metadata.message_type, down=transport.content_bytes(message.content))
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        # the wrapped grid gave every instruction its message id; a reply names the one it answers
        for message in messages:
            if message.metadata.message_id:
                self._sent_type[message.metadata.message_id] = message.metadata.message_type
        return self._count_replies(replies)
