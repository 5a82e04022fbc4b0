"""A client's Context.state survives a server resume: snapshots on the client's own disk, one per server round.

What a client keeps between messages (the installed mask, the top-k residual, later an anchor, a Fisher estimate, a
replay buffer) lives in Flower's `Context.state`, which belongs to one Flower run: a resumed run (a new `flwr run`,
or a new simulation after a crash) starts with an empty one, and the server re-runs the rounds after its last
checkpoint, some of which the client may already have answered. So the ClientApp (`client.client_app`) keeps, for
each node, a `ClientStateStore` in `<client-state-dir>/partition-<id>/` and calls

- `restore_state(...)` before every handler: on the node's first message of a run, a fresh run (`resume=false`)
  deletes the snapshots an older run left there, a resumed run loads the newest one; a train message of round r
  whose state is already past r (the client answered round r or later before the server's resume) rewinds the
  state to the newest snapshot of a round < r and deletes the snapshots of rounds >= r (a timeline that the
  resumed server abandoned);
- `record_state(...)` after every handler that succeeded: the state is written to the slot of the last train
  round the client answered (`round-<r>`; r = 0 before its first train), so slot r always holds the state as it
  is after round r's train reply *and* after every message that came later, up to the next train (a mask, an
  anchor installed by the server). That is exactly the state the next train round starts from.

Invariants:
- The round of the last answered train lives in the state itself (`STATE_MARKER`, a ConfigRecord `{"round": r}`),
  so a state without it is a state this run has not seen yet.
- A handler that fails (an error reply) changes no snapshot and no marker: a train message re-sent after such a
  failure (a mask re-installed) runs on the state as it is.
- A snapshot is the exact bytes of Flower's own RecordDict serialisation; loading it gives equal records.
- Writes are atomic (a temporary file, then rename); the newest `keep` slots stay (the server checkpoints after
  every round, so a client is at most one round ahead of it; `keep` leaves room), and slot 0 always stays: it is
  written when a run first sees the node, so a server that starts over at round 1 (`resume=true` with no
  checkpoint) can always rewind the node to the state before its first round.
- A node that cannot write its folder warns and trains on (its state is then not resumable), since losing a
  resume is better than failing every round.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

log = logging.getLogger("fedsparse")

STATE_MARKER = "client-state"  # ConfigRecord {"round": last train round this state answered}
_SLOT = re.compile(r"round-(\d+)\.state")


class ClientStateError(RuntimeError):
    """The state a train message needs cannot be restored (its snapshot is gone or damaged); the text says which."""


class ClientStateStore:
    """Snapshots of one node's Context.state in `folder`, one file per server round (`round-<r>.state`)."""

    def __init__(self, folder: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    @classmethod
    def for_node(cls, cfg: dict, partition_id: int) -> ClientStateStore:
        """The store of partition `partition_id`: `<client-state-dir>/partition-<id>`, where an empty
        `client-state-dir` means `<output-dir>/client-state`."""
        root = cfg["client-state-dir"] or str(Path(cfg["output-dir"]) / "client-state")
        return cls(Path(root) / f"partition-{partition_id}")

    def _path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:08d}.state"

    def rounds(self) -> list[int]:
        """The rounds that have a snapshot, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _SLOT.fullmatch(p.name)))

    def save(self, server_round: int, state: RecordDict) -> None:
        """Write `state` as the snapshot of `server_round` (replacing one there), then drop all but the newest
        `keep` snapshots (and the one of round 0)."""
        if server_round < 0:
            raise ValueError(f"server_round must be >= 0, got {server_round}")
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(server_round)
        temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
        temporary.write_bytes(recorddict_to_proto(state).SerializeToString())
        os.replace(temporary, path)
        for old in self.rounds()[:-self.keep]:
            if old != 0:
                self._path(old).unlink(missing_ok=True)

    def load(self, server_round: int) -> RecordDict:
        """The snapshot of `server_round`; ClientStateError if it is missing or damaged."""
        path = self._path(server_round)
        try:
            return recorddict_from_proto(ProtoRecordDict.FromString(path.read_bytes()))
        except Exception as err:  # a missing file, or protobuf's DecodeError and friends for a damaged one
            raise ClientStateError(f"cannot read the client state snapshot {path}: {type(err).__name__}: {err}"
                                   ) from err

    def discard_from(self, server_round: int) -> None:
        """Delete the snapshots of `server_round` and every later round."""
        for later in (r for r in self.rounds() if r >= server_round):
            self._path(later).unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every snapshot (the folder itself stays)."""
        self.discard_from(0)


def answered_round(state: RecordDict) -> int | None:
    """The last train round `state` answered (0 before the first), or None for a state this run has not seen."""
    if STATE_MARKER not in state:
        return None
    return int(state[STATE_MARKER]["round"])


def replace_state(state: RecordDict, saved: RecordDict) -> None:
    """Make `state` (Flower's Context.state, changed in place) hold exactly the records of `saved`."""
    for key in list(state.keys()):
        del state[key]
    for key, record in saved.items():
        state[key] = record


def restore_state(state: RecordDict, store: ClientStateStore, *, resume: bool, train_round: int | None) -> None:
    """Before a handler: bring `state` to where the message must start from (see the module docstring).
    `train_round` is the server round of a train message, None for any other message."""
    if answered_round(state) is None:  # the node's first message in this run
        saved = store.rounds() if resume else []
        if not resume:
            store.clear()
        if saved:
            replace_state(state, store.load(saved[-1]))
            if answered_round(state) is None:  # a snapshot written without the marker: its slot says the round
                state[STATE_MARKER] = ConfigRecord({"round": saved[-1]})
            log.info("client state restored from %s (round %d)", store.folder, saved[-1])
        else:  # a run from scratch: its round-0 slot is the empty state
            state[STATE_MARKER] = ConfigRecord({"round": 0})
            _save(store, 0, state)
    current = answered_round(state)
    if train_round is None or current is None or current < train_round:
        return
    earlier = [r for r in store.rounds() if r < train_round]
    if not earlier:
        raise ClientStateError(f"train round {train_round}: this client already answered round {current}, and "
                               f"no snapshot of a round before {train_round} is left in {store.folder} to rewind to")
    replace_state(state, store.load(earlier[-1]))
    store.discard_from(train_round)
    log.info("client state rewound to round %d for the re-run of round %d", earlier[-1], train_round)


def record_state(state: RecordDict, store: ClientStateStore, *, train_round: int | None) -> None:
    """After a handler that succeeded: a train message moves the marker to its round; the state is then written
    to the slot of the marker's round. A folder that cannot be written is warned about, not raised."""
    if train_round is not None:
        state[STATE_MARKER] = ConfigRecord({"round": train_round})
    current = answered_round(state)
    _save(store, current if current is not None else 0, state)


def _save(store: ClientStateStore, server_round: int, state: RecordDict) -> None:
    try:
        store.save(server_round, state)
    except OSError as err:
        log.warning("client state not saved in %s (%s): a resumed run cannot restore this client's state",
                    store.folder, err)
