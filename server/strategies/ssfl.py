"""SSFL: clients score |w * dL/dw| at the shared initialisation; the server averages the scores into one global
top-k mask, fixed for the run (Ohib et al., "SSFL: Discovering Sparse Unified Subnetworks at Initialization").

Cheaper uploads (beyond the paper; both off by default, and then every byte and every mask is as before):
- `sparse.saliency-dtype` float16/bfloat16: the scores travel in that dtype; the server upcasts to float32.
- `sparse.saliency-topk` x > 0: each client sends only its own top k' = ceil(x * k) scores (k = the mask's kept
  count, round(density * num_maskable)) as one fedsparse.codec buffer (positions + values); the server scatters
  them into a dense vector (missing = 0) and averages with the usual weights.
When either is on, the query's config carries `saliency-dtype` and `saliency-keep` (k', 0 = dense).
- `sparse.saliency-init` "rebuild": the query carries no model, only the fingerprint of the server's initial state
  (`init-fingerprint`); each client rebuilds the run's seeded initial model itself and scores it only if its
  fingerprint matches. A client whose rebuild differs (another torch version, a run that does not start from the
  seeded init) answers with an error, and the server asks it again with the model sent: the scores, and so the
  mask, are those of the server's initial state either way; the query's down bytes shrink from the dense model to
  a few hundred bytes per client."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedsparse import codec, replies, sparse, transport
from fedsparse.config import SALIENCY_AGGREGATIONS, SALIENCY_DTYPES, SALIENCY_INITS
from server.strategies.base import ReplyError, weighted_mean
from server.strategies.masked import MaskedFedAvg
from server.strategies.nodes import sample_partitions

log = logging.getLogger("fedsparse")


class SSFL(MaskedFedAvg):
    """A global mask from the clients' saliency scores at the initial model (one `query.saliency` exchange).

    Parameters (keyword only, besides MaskedFedAvg's)
    -------------------------------------------------
    saliency_fraction : share of the partitions asked for scores (seeded by `seed`), in (0, 1].
    saliency_aggregation : "weighted" (by the clients' example counts) or "mean" (each client alike).
    saliency_dtype : "float32" (default), "float16" or "bfloat16": precision of the uploaded scores.
    saliency_topk : 0 (default: every score) or x > 0: each client uploads its top ceil(x * k) scores, sparse.
    saliency_init : "send" (default: the query carries the initial model) or "rebuild" (the clients rebuild it from
        the run's seed, checked by fingerprint; module docstring).
    """

    name = "ssfl"
    config_keys: frozenset[str] = MaskedFedAvg.config_keys | {"sparse.saliency-fraction", "sparse.saliency-batches",
                                                              "sparse.saliency-aggregation", "sparse.saliency-dtype",
                                                              "sparse.saliency-topk", "sparse.saliency-init"}

    def __init__(self, *, maskable: Sequence[str], saliency_fraction: float = 1.0,
                 saliency_aggregation: str = "weighted", saliency_dtype: str = "float32",
                 saliency_topk: float = 0.0, saliency_init: str = "send", **kwargs) -> None:
        if not 0.0 < saliency_fraction <= 1.0:
            raise ValueError(f"saliency_fraction must be in (0, 1], got {saliency_fraction}")
        if saliency_aggregation not in SALIENCY_AGGREGATIONS:
            raise ValueError(f"saliency_aggregation must be one of {', '.join(SALIENCY_AGGREGATIONS)}, got "
                             f"{saliency_aggregation!r}")
        if saliency_dtype not in SALIENCY_DTYPES:
            raise ValueError(f"saliency_dtype must be one of {', '.join(SALIENCY_DTYPES)}, got {saliency_dtype!r}")
        if not (math.isfinite(saliency_topk) and saliency_topk >= 0.0):
            raise ValueError(f"saliency_topk must be a finite number >= 0, got {saliency_topk}")
        if saliency_init not in SALIENCY_INITS:
            raise ValueError(f"saliency_init must be one of {', '.join(SALIENCY_INITS)}, got {saliency_init!r}")
        super().__init__(maskable=maskable, **kwargs)
        self.saliency_fraction, self.saliency_aggregation = saliency_fraction, saliency_aggregation
        self.saliency_dtype, self.saliency_topk = saliency_dtype, saliency_topk
        self.saliency_init = saliency_init

    @classmethod
    def config_arguments(cls, cfg: dict) -> dict:
        """MaskedFedAvg's arguments plus saliency_fraction, _aggregation, _dtype, _topk and _init (the clients read
        `sparse.saliency-batches` from their own run config)."""
        return {**super().config_arguments(cfg), "saliency_fraction": cfg["sparse.saliency-fraction"],
                "saliency_aggregation": cfg["sparse.saliency-aggregation"],
                "saliency_dtype": cfg.get("sparse.saliency-dtype", "float32"),
                "saliency_topk": cfg.get("sparse.saliency-topk", 0.0),
                "saliency_init": cfg.get("sparse.saliency-init", "send")}

    @property
    def saliency_keep(self) -> int:
        """k': how many scores each client uploads when saliency_topk > 0 (ceil(topk * k), at most every weight);
        0 when saliency_topk is 0 (dense upload)."""
        if self.saliency_topk == 0.0:
            return 0
        n = self.layout.num_maskable
        return min(n, math.ceil(self.saliency_topk * round(self.target_density * n)))

    def make_mask(self, grid: Grid, nodes: dict[int, int], state: sparse.State) -> sparse.Masks:
        """Ask the sampled partitions for saliency scores at `state`, average them, keep the top density."""
        asked = [nodes[p] for p in sample_partitions(self.num_clients, self.saliency_fraction, self.seed, 0)
                 if p in nodes]
        if self.saliency_init == "rebuild":
            answers = self.send(grid, self.saliency_queries(asked, state, send_model=False))
            received = list(answers.replies)
            if answers.errors:  # e.g. a rebuilt model that differs: ask those clients again, with the model
                log.warning("ssfl: %d clients could not score a rebuilt initial model; sending it to them",
                            len(answers.errors))
                received += self.send(grid, self.saliency_queries(sorted(answers.errors), state,
                                                                  send_model=True)).replies
        else:
            received = self.send(grid, self.saliency_queries(asked, state, send_model=True)).replies
        scores = []
        for reply in received:
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

    def saliency_queries(self, node_ids: Sequence[int], state: sparse.State, *, send_model: bool) -> list[Message]:
        """The `query.saliency` messages to `node_ids`: with the dense initial model (`send_model`), or with only
        its fingerprint for the clients to rebuild it."""
        extra = {}
        if self.saliency_dtype != "float32" or self.saliency_topk != 0.0:  # default: the config of before
            extra = {"saliency-dtype": self.saliency_dtype, "saliency-keep": self.saliency_keep}
        if send_model:
            _, dense = sparse.gather(state, self.layout, None)
            content = RecordDict({"arrays": transport.make_payload(torch.zeros(0), dense, "float32"),
                                  "config": self.train_config(0, extra or None)})
        else:
            extra["init-fingerprint"] = sparse.state_fingerprint(state)
            content = RecordDict({"config": self.train_config(0, extra)})
        return [Message(content, dst_node_id=node_id, message_type="query.saliency") for node_id in node_ids]

    def read_scores(self, reply: Message) -> tuple[int, int, torch.Tensor]:
        """(partition id, num-examples, scores) of a valid saliency reply; ReplyError says why not."""
        fields = replies.read_saliency(reply.content, self.known.get(int(reply.metadata.src_node_id)))
        s = self.decode_scores(fields.scores)
        if tuple(s.shape) != (self.layout.num_maskable,):
            raise ReplyError(f"scores hold shape {tuple(s.shape)}, expected ({self.layout.num_maskable},)")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ReplyError("scores must be finite and non-negative")
        return fields.partition_id, fields.num_examples, s

    def decode_scores(self, arr) -> torch.Tensor:
        """The float32 score vector of one reply's `saliency` Array, in the form this run asked for; ReplyError
        if the Array is not that form (wrong dtype or shape, a bad codec buffer, more than k' entries)."""
        n = self.layout.num_maskable
        if self.saliency_keep == 0:
            wire = "uint16" if self.saliency_dtype == "bfloat16" else self.saliency_dtype
            if arr.dtype != wire or tuple(arr.shape) != (n,):
                raise ReplyError(f"scores must be {wire} of shape ({n},), got {arr.dtype} {tuple(arr.shape)}")
            try:
                return transport.from_wire(arr.numpy().copy(), self.saliency_dtype)
            except Exception as err:  # a garbled npy buffer
                raise ReplyError(f"scores cannot be decoded: {err}") from err
        if arr.dtype != "uint8" or len(arr.shape) != 1:
            raise ReplyError(f"sparse scores must be a 1-d uint8 codec buffer, got {arr.dtype} {tuple(arr.shape)}")
        try:
            shape, positions, values = codec.decode_sparse(arr.numpy().tobytes(), max_elements=n)
        except Exception as err:  # CodecError or a garbled npy buffer
            raise ReplyError(f"sparse scores cannot be decoded: {err}") from err
        if shape != (n,) or positions.size > self.saliency_keep:
            raise ReplyError(f"sparse scores must have shape ({n},) and at most {self.saliency_keep} entries, got "
                             f"{shape} with {positions.size}")
        dense = np.zeros(n, dtype=np.float32)
        dense[positions] = values
        return torch.from_numpy(dense)
