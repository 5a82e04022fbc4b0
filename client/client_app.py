"""Flower ClientApp: routes every message action to its handler in `fedsparse.client.HANDLERS`."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsparse.client import HANDLERS
from fedsparse.config import resolve

# Two simulated clients share two cores: one thread each avoids oversubscription, and keeps CPU results
# bit-for-bit reproducible.
torch.set_num_threads(1)

app = ClientApp()


def _route(message_type: str):
    def run(msg: Message, context: Context) -> Message:
        cfg = resolve(context.run_config)
        partition_id = int(context.node_config["partition-id"])
        content = HANDLERS[message_type](msg.content, context.state, cfg, partition_id)
        return Message(content, reply_to=msg)

    return run


for _message_type in HANDLERS:
    _category, _, _action = _message_type.partition(".")
    getattr(app, _category)(_action or "default")(_route(_message_type))
