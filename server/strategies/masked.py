"""Training inside a fixed global mask: the shared transport of `ssfl`, `random` and `magnitude`.

Once the mask exists it is installed on every client (a packed bitmap, 1 bit per maskable weight, plus its
fingerprint), then each round only the masked values and the dense tensors travel, tagged with the fingerprint.
Subclasses say only when the mask is made (`mask_due`) and how (`make_mask`).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedsparse import sparse
from server.strategies.base import Channel, FedAvg, log


class MaskedFedAvg(FedAvg):
    def __init__(self, cfg: dict, layout: sparse.Layout) -> None:
        super().__init__(cfg, layout)
        sparse.check_density(layout, self.target_density, cfg["mask-scope"])
        self.installed = False
        self.client_fingerprints: dict[int, str] = {}  # partition id -> fingerprint of the mask it stored

    @property
    def value_dtype(self) -> str:
        return self.cfg["value-dtype"] if self.masks is not None else "float32"

    @property
    def target_density(self) -> float:
        return 1.0 - self.cfg["sparsity"]

    def mask_due(self, server_round: int) -> bool:
        return True

    def make_mask(self, channel: Channel, nodes: dict[int, int], state: sparse.State) -> sparse.Masks:
        raise NotImplementedError

    def setup(self, channel: Channel, nodes: dict[int, int], state: sparse.State, server_round: int
              ) -> sparse.State:
        if self.masks is None and self.mask_due(server_round):
            self.masks = self.make_mask(channel, nodes, state)
            bits = sparse.pack_mask(self.masks, self.layout)
            self.fingerprint = sparse.fingerprint(bits)
            log.info("%s mask: density %.4f over %d maskable weights, fingerprint %s", self.name, self.density,
                     self.layout.num_maskable, self.fingerprint)
        if self.masks is not None and not self.installed:
            self.install(channel, nodes)
        if self.masks is None:
            return state
        return {k: v * self.masks[k] if k in self.masks else v for k, v in state.items()}

    def install(self, channel: Channel, nodes: dict[int, int]) -> None:
        """Send the mask to every client once; each answers with the fingerprint of what it stored."""
        bits = sparse.pack_mask(self.masks, self.layout)
        content = RecordDict({"mask": ArrayRecord({"bits": Array(bits)}),
                              "config": ConfigRecord({"fingerprint": self.fingerprint})})
        msgs = [Message(content, dst_node_id=n, message_type="query.install_mask") for n in nodes.values()]
        replies = channel.send(msgs, logical_down=bits.size)
        for r in replies:
            got = str(r.content["config"].get("fingerprint", ""))
            self.client_fingerprints[int(r.content["metrics"].get("partition-id", -1))] = got
            if got != self.fingerprint:
                channel.fail(r.metadata.src_node_id, f"installed mask {got}, expected {self.fingerprint}",
                             "query.install_mask")
        self.installed = True

    def checkpoint(self) -> dict:
        if self.masks is None:
            return {}
        return {"mask-bits": sparse.pack_mask(self.masks, self.layout), "fingerprint": self.fingerprint}

    def restore(self, ckpt: dict) -> None:
        if "mask-bits" in ckpt:
            self.masks = sparse.unpack_mask(ckpt["mask-bits"], self.layout)
            self.fingerprint = ckpt["fingerprint"]
            self.installed = False  # a restarted server re-installs it on the clients
