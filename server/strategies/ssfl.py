"""SSFL: clients score |w * dL/dw| at the shared initialisation; the server averages the scores into one global
top-k mask, fixed for the run (Ohib et al., "SSFL: Discovering Sparse Unified Subnetworks at Initialization")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedsparse import replies, sparse, transport
from fedsparse.config import SALIENCY_AGGREGATIONS
from server.strategies.base import ReplyError, weighted_mean
from server.strategies.masked import MaskedFedAvg
from server.strategies.nodes import sample_partitions


class SSFL(MaskedFedAvg):
    """A global mask from the clients' saliency scores at the initial model (one `query.saliency` exchange).

    Parameters (keyword only, besides MaskedFedAvg's)
    -------------------------------------------------
    saliency_fraction : share of the partitions asked for scores (seeded by `seed`), in (0, 1].
    saliency_aggregation : "weighted" (by the clients' example counts) or "mean" (each client alike).
    """

    name = "ssfl"
    config_keys: frozenset[str] = MaskedFedAvg.config_keys | {"sparse.saliency-fraction", "sparse.saliency-batches",
                                                              "sparse.saliency-aggregation"}

    def __init__(self, *, maskable: Sequence[str], saliency_fraction: float = 1.0,
                 saliency_aggregation: str = "weighted", **kwargs) -> None:
        if not 0.0 < saliency_fraction <= 1.0:
            raise ValueError(f"saliency_fraction must be in (0, 1], got {saliency_fraction}")
        if saliency_aggregation not in SALIENCY_AGGREGATIONS:
            raise ValueError(f"saliency_aggregation must be one of {', '.join(SALIENCY_AGGREGATIONS)}, got "
                             f"{saliency_aggregation!r}")
        super().__init__(maskable=maskable, **kwargs)
        self.saliency_fraction, self.saliency_aggregation = saliency_fraction, saliency_aggregation

    @classmethod
    def config_arguments(cls, cfg: dict) -> dict:
        """MaskedFedAvg's arguments plus saliency_fraction and saliency_aggregation (the clients read
        `sparse.saliency-batches` from their own run config)."""
        return {**super().config_arguments(cfg), "saliency_fraction": cfg["sparse.saliency-fraction"],
                "saliency_aggregation": cfg["sparse.saliency-aggregation"]}

    def make_mask(self, grid: Grid, nodes: dict[int, int], state: sparse.State) -> sparse.Masks:
        """Ask the sampled partitions for saliency scores at `state`, average them, keep the top density."""
        asked = sample_partitions(self.num_clients, self.saliency_fraction, self.seed, 0)
        _, dense = sparse.gather(state, self.layout, None)
        content = RecordDict({"arrays": transport.make_payload(torch.zeros(0), dense, "float32"),
                              "config": self.train_config(0)})
        messages = [Message(content, dst_node_id=nodes[p], message_type="query.saliency")
                    for p in asked if p in nodes]
        scores = []
        for reply in self.send(grid, messages).replies:
            try:
                scores.append(self.read_scores(reply))
            except ReplyError as err:
                self.failures.add(reply.metadata.src_node_id, f"rejected saliency: {err}", "query.saliency")
        if not scores:
            raise RuntimeError("no client returned valid saliency scores; cannot build the SSFL mask")
        scores.sort(key=lambda s: s[0])
        if self.saliency_aggregation == "mean":
            mean = weighted_mean([(1.0, s) for _, _, s in scores])
        else:
            mean = weighted_mean([(float(n), s) for _, n, s in scores])
        per_tensor = sparse.split_flat(mean, self.layout, self.layout.maskable)
        return sparse.topk_mask(per_tensor, self.target_density, self.mask_scope)

    def read_scores(self, reply: Message) -> tuple[int, int, torch.Tensor]:
        """(partition id, num-examples, scores) of a valid saliency reply; ReplyError says why not."""
        fields = replies.read_saliency(reply.content, self.known.get(int(reply.metadata.src_node_id)))
        arr = fields.scores
        if arr.dtype != "float32" or tuple(arr.shape) != (self.layout.num_maskable,):
            raise ReplyError(f"scores must be float32 of shape ({self.layout.num_maskable},), got "
                             f"{arr.dtype} {tuple(arr.shape)}")
        try:
            s = torch.from_numpy(arr.numpy().copy())
        except Exception as err:  # a garbled npy buffer
            raise ReplyError(f"scores cannot be decoded: {err}") from err
        if tuple(s.shape) != (self.layout.num_maskable,):
            raise ReplyError(f"scores hold shape {tuple(s.shape)}, expected ({self.layout.num_maskable},)")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ReplyError("scores must be finite and non-negative")
        return fields.partition_id, fields.num_examples, s
