"""SSFL: clients score |w * dL/dw| at the shared initialisation; the server averages the scores into one global
top-k mask, fixed for the run (Ohib et al., "SSFL: Discovering Sparse Unified Subnetworks at Initialization")."""

from __future__ import annotations

import torch
from flwr.app import Message, RecordDict

from fedsparse import replies, sparse, transport
from server.strategies.base import Channel, ReplyError, sample_partitions, weighted_mean
from server.strategies.masked import MaskedFedAvg


class SSFL(MaskedFedAvg):
    name = "ssfl"

    def make_mask(self, channel: Channel, nodes: dict[int, int], state: sparse.State) -> sparse.Masks:
        cfg = self.cfg
        asked = sample_partitions(cfg["num-clients"], cfg["sparse.saliency-fraction"], cfg["seed"], 0)
        _, dense = sparse.gather(state, self.layout, None)
        content = RecordDict({"arrays": transport.make_payload(torch.zeros(0), dense, "float32"),
                              "config": self.train_config(0)})
        msgs = [Message(content, dst_node_id=nodes[p], message_type="query.saliency") for p in asked if p in nodes]
        answers = channel.send(msgs, logical_down=transport.logical_payload_bytes(self.layout, None, "float32"))
        scores = []
        for r in answers:
            try:
                scores.append(self.read_scores(r))
            except ReplyError as err:
                channel.fail(r.metadata.src_node_id, f"rejected saliency: {err}", "query.saliency")
        channel.traffic.logical_up += 4 * self.layout.num_maskable * len(scores)
        if not scores:
            raise RuntimeError("no client returned valid saliency scores; cannot build the SSFL mask")
        scores.sort(key=lambda s: s[0])
        if cfg["sparse.saliency-aggregation"] == "mean":
            mean = weighted_mean([(1.0, s) for _, _, s in scores])
        else:
            mean = weighted_mean([(float(n), s) for _, n, s in scores])
        per_tensor = sparse.split_flat(mean, self.layout, self.layout.maskable)
        return sparse.topk_mask(per_tensor, self.target_density, cfg["sparse.mask-scope"])

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
