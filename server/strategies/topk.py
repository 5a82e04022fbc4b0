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

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fedsparse import codec, sparse, transport
from fedsparse.transport import TOPK_KEY as UPDATE_KEY
from fedsparse.transport import TOPK_STYPE as CODEC_STYPE
from fedsparse.transport import ReplyError
from server.strategies.base import Channel, FedAvg

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
    """Dense model down in value-dtype; per client the codec-encoded top-k of its error-corrected update up."""

    name = "topk"

    def __init__(self, cfg: dict, layout: sparse.Layout) -> None:
        super().__init__(cfg, layout)
        self.numel = layout.num_maskable + layout.num_dense
        self._logical_up = 0  # logical bytes of the replies accepted in the current aggregation

    @property
    def value_dtype(self) -> str:
        return self.cfg["sparse.value-dtype"]

    @property
    def density(self) -> float:
        return self.cfg["sparse.topk-density"]

    def train_content(self, server_round: int, state: sparse.State) -> RecordDict:
        """What every client of the round receives: the whole model, unmasked, in value-dtype."""
        _, dense = sparse.gather(state, self.layout, None)
        return RecordDict({"arrays": transport.make_payload(torch.zeros(0), dense, self.value_dtype),
                           "config": self.train_config(server_round)})

    def configure_train(self, server_round: int, state: sparse.State, node_ids: list[int]) -> list[Message]:
        """The train.topk messages of `server_round`: the dense model and the config, to every node."""
        self.global_state = state
        self.server_round = server_round
        content = self.train_content(server_round, state)
        return [Message(content, dst_node_id=n, message_type=MESSAGE_TYPE) for n in node_ids]

    def decode_payload(self, arrays: ArrayRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """(no masked values, the whole update as `dense`), decoded from the codec bytes."""
        update, logical = self.decode_update(arrays)
        self._logical_up += logical
        return torch.zeros(0), update

    def decode_update(self, arrays: ArrayRecord) -> tuple[torch.Tensor, int]:
        """The dense float32 update in a reply's ArrayRecord, and its logical bytes."""
        if list(arrays.keys()) != [UPDATE_KEY]:
            raise ReplyError(f"arrays must be exactly ['{UPDATE_KEY}'], got {list(arrays.keys())}")
        arr = arrays[UPDATE_KEY]
        if arr.stype != CODEC_STYPE:
            raise ReplyError(f"'{UPDATE_KEY}' has stype {arr.stype!r}, expected {CODEC_STYPE!r}")
        try:
            # max_elements bounds what a hostile header can make us allocate; the header is checked first
            header = codec.read_header(arr.data, max_elements=self.numel)
            if header.shape != (self.numel,):
                raise ReplyError(f"update has shape {header.shape}, expected ({self.numel},)")
            if header.value_format != self.value_dtype:
                raise ReplyError(f"update values are {header.value_format}, expected {self.value_dtype}")
            _, idx, vals = codec.decode_sparse(arr.data, max_elements=self.numel)
        except codec.CodecError as err:
            raise ReplyError(f"'{UPDATE_KEY}' is not a valid codec buffer: {err}") from err
        if not np.all(np.isfinite(vals)):
            raise ReplyError("update contains NaN or Inf")
        update = torch.zeros(self.numel)
        update[torch.from_numpy(idx)] = torch.from_numpy(vals)
        return update, logical_update_bytes(header)

    def aggregate_train(self, server_round: int, replies: list[Message], channel: Channel
                        ) -> tuple[sparse.State | None, dict]:
        # FedAvg's aggregation applies as is (no mask: everything is in `dense`); only the logical uplink
        # differs, since each reply's size depends on what its codec chose.
        self._logical_up = 0
        before = channel.traffic.logical_up
        out = super().aggregate_train(server_round, replies, channel)
        channel.traffic.logical_up = before + self._logical_up
        return out
