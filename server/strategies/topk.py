"""Top-k with error feedback: the dense global model goes down, each client's top-k update comes up.

Down, the payload is FedAvg's with no mask (every tensor in `dense`), in `value-dtype`. Each client trains, adds
its carried residual to its update, keeps the `topk-density` largest entries and replies with them encoded by
`fedsparse.codec` (Rice or bitmap indices, values in `value-dtype`), as one Array holding the raw codec bytes
(the client handler of `train.topk`). The server decodes every reply, densifies it and adds the example-weighted
mean of the updates to the global model.

Logical uplink bytes of a reply = kept values x bytes per value + ceil(index-stream bits / 8), where the index
stream is the one the codec chose (Rice: unary + remainder bits; bitmap: one bit per entry; dense: none). The
codec header (23-31 B) and the Array key are framing, like the npy header of the other strategies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsparse import codec, sparse, transport
from fedsparse.config import VALUE_DTYPES
from fedsparse.transport import TOPK_KEY as UPDATE_KEY
from fedsparse.transport import TOPK_STYPE as CODEC_STYPE
from fedsparse.transport import ReplyError
from server.strategies.base import FedAvg, RoundPlan

MESSAGE_TYPE = "train.topk"  # the client's top-k train handler


def index_bits(header: codec.Header) -> int:
    """Bits of the index stream the codec chose for this buffer (padding and header excluded)."""
    return {"dense": 0, "bitmap": header.numel, "rice": header.unary_bits + header.kept * header.rice_k}[
        header.layout]


def logical_update_bytes(header: codec.Header) -> int:
    """Kept values x value bytes + the index stream rounded up to whole bytes."""
    value_bytes = 1 if header.value_format == "int8" else transport.VALUE_BYTES[header.value_format]
    return header.kept * value_bytes + math.ceil(index_bits(header) / 8)


class TopK(FedAvg):
    """Dense model down in value_dtype; per client the codec-encoded top-k of its error-corrected update up.

    Parameters (keyword only, besides FedAvg's)
    -------------------------------------------
    topk_density : the share of the update's entries each client sends, in (0, 1].
    value_dtype : the dtype of the model values down and of the kept update values up.
    """

    name = "topk"
    message_type = MESSAGE_TYPE
    config_keys: frozenset[str] = frozenset({"sparse.mask-layers", "sparse.value-dtype", "sparse.topk-density"})

    def __init__(self, *, maskable: Sequence[str], topk_density: float = 0.1, value_dtype: str = "float32",
                 **kwargs) -> None:
        if not 0.0 < topk_density <= 1.0:
            raise ValueError(f"topk_density must be in (0, 1], got {topk_density}")
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype!r}")
        super().__init__(maskable=maskable, **kwargs)
        self.topk_density, self.topk_value_dtype = topk_density, value_dtype

    @classmethod
    def config_arguments(cls, cfg: dict) -> dict:
        """FedAvg's arguments plus topk_density and value_dtype."""
        return {**super().config_arguments(cfg), "topk_density": cfg["sparse.topk-density"],
                "value_dtype": cfg["sparse.value-dtype"]}

    @property
    def value_dtype(self) -> str:
        """The dtype of the values both ways."""
        return self.topk_value_dtype

    @property
    def density(self) -> float:
        """The share of the update each client sends."""
        return self.topk_density

    @property
    def numel(self) -> int:
        """Entries of the whole model (every tensor travels in `dense`)."""
        return self.layout.num_maskable + self.layout.num_dense

    def train_content(self, server_round: int, state: sparse.State, config: ConfigRecord | None = None
                      ) -> RecordDict:
        """What every client of the round receives: the whole model, unmasked, in value_dtype."""
        _, dense = sparse.gather(state, self.layout, None)
        return RecordDict({"arrays": transport.make_payload(torch.zeros(0), dense, self.value_dtype),
                           "config": self.train_config(server_round, config)})

    def decode_payload(self, arrays: ArrayRecord, plan: RoundPlan) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(no masked values, the whole update as `dense`, the reply's logical bytes) from the codec bytes."""
        update, logical = self.decode_update(arrays)
        return torch.zeros(0), update, logical

    def decode_update(self, arrays: ArrayRecord) -> tuple[torch.Tensor, int]:
        """The dense float32 update in a reply's ArrayRecord, and its logical bytes."""
        if list(arrays.keys()) != [UPDATE_KEY]:
            raise ReplyError(f"arrays must be exactly ['{UPDATE_KEY}'], got {list(arrays.keys())}")
        arr = arrays[UPDATE_KEY]
        if arr.stype != CODEC_STYPE:
            raise ReplyError(f"'{UPDATE_KEY}' has stype {arr.stype!r}, expected {CODEC_STYPE!r}")
        numel = self.numel
        try:
            # max_elements bounds what a hostile header can make us allocate; the header is checked first
            header = codec.read_header(arr.data, max_elements=numel)
            if header.shape != (numel,):
                raise ReplyError(f"update has shape {header.shape}, expected ({numel},)")
            if header.value_format != self.value_dtype:
                raise ReplyError(f"update values are {header.value_format}, expected {self.value_dtype}")
            _, idx, vals = codec.decode_sparse(arr.data, max_elements=numel)
        except codec.CodecError as err:
            raise ReplyError(f"'{UPDATE_KEY}' is not a valid codec buffer: {err}") from err
        if not np.all(np.isfinite(vals)):
            raise ReplyError("update contains NaN or Inf")
        update = torch.zeros(numel)
        update[torch.from_numpy(idx)] = torch.from_numpy(vals)
        return update, logical_update_bytes(header)
