"""Training inside a fixed global mask: the shared transport of `ssfl`, `random` and `magnitude`.

Once the mask exists it is installed on every client (a packed bitmap, 1 bit per maskable weight, plus its
fingerprint), then each round only the masked values and the dense tensors travel, tagged with the fingerprint.
Subclasses say only when the mask is made (`mask_due`) and how (`make_mask`).

The strategy tracks which nodes hold the current mask (`holders`: the nodes whose install reply echoed its
fingerprint). Before every round (in `configure_train`) the mask goes to each known node that does not hold it: a
node whose install failed, a node that answered a train message with the client's "no installed mask matches"
error (it restarted and lost its Context.state), and a node that joined after discovery. So a node that lost its
mask trains again from the next round on.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedsparse import replies, sparse
from fedsparse.config import VALUE_DTYPES
from server.strategies.base import FedAvg, ReplyError, log

MASK_SCOPES = ("global", "layerwise")


class MaskedFedAvg(FedAvg):
    """FedAvg inside one global mask, made once by the subclass and (re-)installed on the nodes that lack it.

    Parameters (keyword only, besides FedAvg's)
    -------------------------------------------
    sparsity : the share of maskable weights pruned (density = 1 - sparsity), in [0, 1).
    mask_scope : "global" (one threshold over all maskable weights) or "layerwise" (the density in every layer).
    value_dtype : the dtype of the model values once the mask exists ("float32", "float16", "bfloat16", "int8").
    """

    config_keys: frozenset[str] = frozenset({"sparse.mask-layers", "sparse.sparsity", "sparse.mask-scope",
                                             "sparse.value-dtype"})

    def __init__(self, *, maskable: Sequence[str], sparsity: float = 0.9, mask_scope: str = "global",
                 value_dtype: str = "float32", **kwargs) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if mask_scope not in MASK_SCOPES:
            raise ValueError(f"mask_scope must be one of {', '.join(MASK_SCOPES)}, got {mask_scope!r}")
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype!r}")
        super().__init__(maskable=maskable, **kwargs)
        self.sparsity, self.mask_scope, self.masked_value_dtype = sparsity, mask_scope, value_dtype
        self.holders: set[int] = set()  # node ids that confirmed holding the current mask
        self.client_fingerprints: dict[int, str] = {}  # partition id -> fingerprint of the mask it stored

    @classmethod
    def config_arguments(cls, cfg: dict) -> dict:
        """FedAvg's arguments plus sparsity, mask_scope and value_dtype."""
        return {**super().config_arguments(cfg), "sparsity": cfg["sparse.sparsity"],
                "mask_scope": cfg["sparse.mask-scope"], "value_dtype": cfg["sparse.value-dtype"]}

    @property
    def value_dtype(self) -> str:
        """`value_dtype` once the mask exists; float32 before (dense rounds)."""
        return self.masked_value_dtype if self.masks is not None else "float32"

    @property
    def target_density(self) -> float:
        """The density the mask is made at."""
        return 1.0 - self.sparsity

    def check_layout(self, layout: sparse.Layout) -> None:
        """A mask of the target density must leave every layer (layerwise) or the model (global) a weight."""
        sparse.check_density(layout, self.target_density, self.mask_scope)

    def mask_due(self, server_round: int) -> bool:
        """Whether the mask is to be made before `server_round` (once; it is then fixed)."""
        return True

    def make_mask(self, grid: Grid, nodes: dict[int, int], state: sparse.State) -> sparse.Masks:
        """The global mask, from {partition id: node id} and the global model; may exchange through `grid`."""
        raise NotImplementedError

    def prepare(self, grid: Grid, server_round: int, state: sparse.State) -> sparse.State:
        """Make the mask when due, install it where it is missing; returns the masked global model."""
        nodes = self.roster.partitions()
        if self.masks is None and self.mask_due(server_round):
            self.masks = self.make_mask(grid, nodes, state)
            bits = sparse.pack_mask(self.masks, self.layout)
            self.fingerprint = sparse.fingerprint(bits)
            log.info("%s mask: density %.4f over %d maskable weights, fingerprint %s", self.name, self.density,
                     self.layout.num_maskable, self.fingerprint)
        if self.masks is None:
            return state
        missing = {p: n for p, n in nodes.items() if n not in self.holders}
        if missing:
            self.install(grid, missing)
        return {k: v * self.masks[k] if k in self.masks else v for k, v in state.items()}

    def install(self, grid: Grid, nodes: dict[int, int]) -> None:
        """Send the mask to these {partition id: node id} (query.install_mask); each answers with the fingerprint
        of what it stored, and only a node whose fingerprint matches becomes a holder."""
        bits = sparse.pack_mask(self.masks, self.layout)
        content = RecordDict({"mask": ArrayRecord({"bits": Array(bits)}),
                              "config": ConfigRecord({"fingerprint": self.fingerprint})})
        messages = [Message(content, dst_node_id=n, message_type="query.install_mask") for n in nodes.values()]
        for reply in self.send(grid, messages).replies:
            node_id = int(reply.metadata.src_node_id)
            try:
                got = replies.read_install(reply.content, self.known.get(node_id))
            except ReplyError as err:
                self.failures.add(node_id, f"rejected install reply: {err}", "query.install_mask")
                continue
            self.client_fingerprints[got.partition_id] = got.fingerprint
            if got.fingerprint != self.fingerprint:
                self.failures.add(node_id, f"installed mask {got.fingerprint}, expected {self.fingerprint}",
                                  "query.install_mask")
            else:
                self.holders.add(node_id)

    def note_client_errors(self, errors: dict[int, str]) -> None:
        """A node that says it holds no matching mask loses its holder status: the next round re-installs."""
        for node_id, reason in errors.items():
            if sparse.MASK_MISSING in reason:
                self.holders.discard(node_id)

    def state_dict(self) -> dict:
        """The mask (packed bits) and its fingerprint, once made."""
        if self.masks is None:
            return {}
        return {"mask-bits": sparse.pack_mask(self.masks, self.layout), "fingerprint": self.fingerprint,
                "layout": self.layout}

    def load_state_dict(self, state: dict) -> None:
        """Restore the mask; no node holds it yet (a restarted server re-installs it on the clients)."""
        if "mask-bits" in state:
            if self.layout is None:  # not bound to a model yet: the layout the mask was made for
                self.layout = state["layout"]
            self.masks = sparse.unpack_mask(state["mask-bits"], self.layout)
            self.fingerprint = state["fingerprint"]
            self.holders = set()
