"""Flower ClientApp: routes every message action to its handler in `client.handlers.HANDLERS`.

Importing this module imports every module of `client/` that registers handlers (`client.handlers`,
`client.continual` for the continual-learning actions and `client.merging` for the merge experiment's), so the app
routes all of them.

Around every handler the node's Context.state is kept on its disk (`client.state`), so that a resumed run
restores it: `restore_state` before, `record_state` after a handler that succeeded.

`build_app(mods)` makes the same ClientApp with Flower mods around every handler (tests/faults.py wraps it with
a fault-injecting mod); `app` is the plain one that pyproject.toml names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import client.connectivity  # (registers the connectivity experiment's handler)
import client.continual  # (registers the continual-learning handlers)
import client.language  # (registers the language-model handlers)
import client.language_facts  # (registers the mechanistic fact-unlearning handlers)
import client.language_unlearning  # (registers the LM unlearning handler)
import client.merging  # (registers the merge experiment's handlers)
import client.transfer  # (registers the transfer experiment's handlers)
import client.unlearning  # (registers the unlearning handlers)
import client.unlearning_local  # noqa: F401  (registers the unlearn experiment's registry-method handler)
from client.handlers import HANDLERS
from client.state import ClientStateStore, record_state, restore_state
from fedsparse.config import resolve

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def _route(message_type: str) -> Callable[[Message, Context], Message]:
    category = message_type.partition(".")[0]

    def run(msg: Message, context: Context) -> Message:
        # Set where clients run, not at import: two simulated clients share two cores (one thread each avoids
        # oversubscription and keeps CPU results bit-for-bit reproducible), while the server process that
        # imports this module keeps all its threads for aggregation and evaluation.
        torch.set_num_threads(1)
        cfg = resolve(context.run_config)
        partition_id = int(context.node_config["partition-id"])
        # the node's state on its disk: restored on a resumed run, rewound for a round the server re-runs
        store = ClientStateStore.for_node(cfg, partition_id)
        train_round = int(msg.content["config"]["server-round"]) if category == "train" else None
        restore_state(context.state, store, resume=cfg["resume"], train_round=train_round)
        content = HANDLERS[message_type](msg.content, context.state, cfg, partition_id)
        record_state(context.state, store, train_round=train_round)
        return Message(content, reply_to=msg)

    return run


def build_app(mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp with one route per handler in `client.handlers.HANDLERS`, wrapped by `mods`."""
    client_app = ClientApp(mods=mods)
    for message_type in HANDLERS:
        category, _, action = message_type.partition(".")
        getattr(client_app, category)(action or "default")(_route(message_type))
    return client_app


app = build_app()
