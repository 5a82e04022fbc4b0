"""Training inside a fixed global mask: the shared transport of `ssfl`, `random` and `magnitude`.

Once the mask exists it is installed on every client (a packed bitmap, 1 bit per maskable weight, plus its
fingerprint), then each round only the masked values and the dense tensors travel, tagged with the fingerprint.
Subclasses say only when the mask is made (`mask_due`) and how (`make_mask`).

The server tracks which nodes hold the current mask (`holders`: the nodes whose install reply echoed its
fingerprint). Before every round the mask goes to each known node that does not hold it: a node whose install
failed, a node that answered a train message with the client's "no installed mask matches" error (it restarted
and lost its Context.state), and a node that joined after discovery. So a node that lost its mask trains again
from the next round on.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedsparse import replies, sparse
from server.strategies.base import Channel, FedAvg, ReplyError, log


class MaskedFedAvg(FedAvg):
    """FedAvg inside one global mask, made once by the subclass and (re-)installed on the nodes that lack it."""

    def __init__(self, cfg: dict, layout: sparse.Layout) -> None:
        super().__init__(cfg, layout)
        sparse.check_density(layout, self.target_density, cfg["sparse.mask-scope"])
        self.holders: set[int] = set()  # node ids that confirmed holding the current mask
        self.client_fingerprints: dict[int, str] = {}  # partition id -> fingerprint of the mask it stored

    @property
    def value_dtype(self) -> str:
        return self.cfg["sparse.value-dtype"] if self.masks is not None else "float32"

    @property
    def target_density(self) -> float:
        return 1.0 - self.cfg["sparse.sparsity"]

    def mask_due(self, server_round: int) -> bool:
        """Whether the mask is to be made before `server_round` (once; it is then fixed)."""
        return True

    def make_mask(self, channel: Channel, nodes: dict[int, int], state: sparse.State) -> sparse.Masks:
        """The global mask, from {partition id: node id} and the global model."""
        raise NotImplementedError

    def setup(self, channel: Channel, nodes: dict[int, int], state: sparse.State, server_round: int
              ) -> sparse.State:
        """Make the mask when due, install it where it is missing; returns the masked global model."""
        if self.masks is None and self.mask_due(server_round):
            self.masks = self.make_mask(channel, nodes, state)
            bits = sparse.pack_mask(self.masks, self.layout)
            self.fingerprint = sparse.fingerprint(bits)
            log.info("%s mask: density %.4f over %d maskable weights, fingerprint %s", self.name, self.density,
                     self.layout.num_maskable, self.fingerprint)
        if self.masks is not None:
            missing = {p: n for p, n in nodes.items() if n not in self.holders}
            if missing:
                self.install(channel, missing)
        if self.masks is None:
            return state
        return {k: v * self.masks[k] if k in self.masks else v for k, v in state.items()}

    def install(self, channel: Channel, nodes: dict[int, int]) -> None:
        """Send the mask to these {partition id: node id}; each answers with the fingerprint of what it stored,
        and only a node whose fingerprint matches becomes a holder."""
        bits = sparse.pack_mask(self.masks, self.layout)
        content = RecordDict({"mask": ArrayRecord({"bits": Array(bits)}),
                              "config": ConfigRecord({"fingerprint": self.fingerprint})})
        msgs = [Message(content, dst_node_id=n, message_type="query.install_mask") for n in nodes.values()]
        for r in channel.send(msgs, logical_down=bits.size):
            node_id = int(r.metadata.src_node_id)
            try:
                got = replies.read_install(r.content, self.known.get(node_id))
            except ReplyError as err:
                channel.fail(node_id, f"rejected install reply: {err}", "query.install_mask")
                continue
            self.client_fingerprints[got.partition_id] = got.fingerprint
            if got.fingerprint != self.fingerprint:
                channel.fail(node_id, f"installed mask {got.fingerprint}, expected {self.fingerprint}",
                             "query.install_mask")
            else:
                self.holders.add(node_id)

    def note_client_errors(self, errors: dict[int, str]) -> None:
        """A node that says it holds no matching mask loses its holder status: the next setup re-installs."""
        for node_id, reason in errors.items():
            if sparse.MASK_MISSING in reason:
                self.holders.discard(node_id)

    def checkpoint(self) -> dict:
        if self.masks is None:
            return {}
        return {"mask-bits": sparse.pack_mask(self.masks, self.layout), "fingerprint": self.fingerprint}

    def restore(self, ckpt: dict) -> None:
        if "mask-bits" in ckpt:
            self.masks = sparse.unpack_mask(ckpt["mask-bits"], self.layout)
            self.fingerprint = ckpt["fingerprint"]
            self.holders = set()  # a restarted server re-installs it on the clients
