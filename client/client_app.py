"""Flower ClientApp: routes every message action to its handler in `client.handlers.HANDLERS`.

The routes are the message types of `client.handlers.HANDLER_MODULES`; a handler's module is imported only when a
message of its type arrives (`HANDLERS` imports it on the first lookup). In deployment Flower starts one
`flwr-clientapp` process per message, so importing every experiment's module (language models, merging,
unlearning, with scikit-learn and scipy behind them) for every message cost seconds; importing this module imports
`client.handlers` (torch, flwr, our training code) and nothing of the experiments.

The run config reaches a handler resolved (`client_config`): the node's first message resolves it with
`fedsparse.config.resolve` and records it on the node's disk; later messages read the record back instead of
importing the server's registries, which `resolve` checks names against.

Around every handler the node's Context.state is kept on its disk (`client.state`), so that a resumed run
restores it: `restore_state` before, `record_state` after a handler that succeeded.

`build_app(mods)` makes the same ClientApp with Flower mods around every handler (tests/faults.py wraps it with
a fault-injecting mod); `app` is the plain one that pyproject.toml names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fedsparse.config
from client.handlers import HANDLER_MODULES, HANDLERS, data_cache_dir
from client.state import ClientStateStore, record_state, restore_state
from fedsparse.config import SCHEMA, resolve

log = logging.getLogger(__name__)

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def _config_record_path(run_config: Mapping[str, Any]) -> tuple[Path, str]:
    code = hashlib.sha256(Path(fedsparse.config.__file__).read_bytes()).hexdigest()
    digest = hashlib.sha256(json.dumps({"run-config": dict(run_config), "code": code}, sort_keys=True,
                                       default=repr).encode()).hexdigest()
    where = {"client-state-dir": str(run_config.get("client-state-dir", SCHEMA["client-state-dir"].default)),
             "output-dir": str(run_config.get("output-dir", SCHEMA["output-dir"].default))}
    return data_cache_dir(where) / f"{digest[:32]}.config.json", digest


def _valid(cfg: object) -> bool:
    return (isinstance(cfg, dict) and set(cfg) == set(SCHEMA)
            and all(type(cfg[name]) is key.type for name, key in SCHEMA.items()))


def client_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """`fedsparse.config.resolve(run_config)`, recorded on the node's disk (beside its prepared partitions,
    `client.handlers.data_cache_dir`) by its first message and read back by later ones.

    `resolve` checks names against the server's registries, which imports every experiment (seconds per
    deployed message); the ServerApp resolves the same run config before any message is sent, so a client
    only needs the values. The record is keyed by a hash of the run config and of `fedsparse/config.py`, and is
    used only if its key matches and it holds every key of the schema with its type; otherwise this resolves."""
    path, digest = _config_record_path(run_config)
    try:
        record = json.loads(path.read_text())
        if record.get("key") == digest and _valid(record.get("cfg")):
            return record["cfg"]
        log.warning("client config record %s ignored: another key or not a complete config", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as err:
        log.warning("client config record %s ignored: %s", path, err)
    cfg = resolve(dict(run_config))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"key": digest, "cfg": cfg}))
        temporary.replace(path)
    except (OSError, TypeError, ValueError) as err:
        log.warning("client config record not written to %s: %s", path, err)
    return cfg


def _route(message_type: str) -> Callable[[Message, Context], Message]:
    category = message_type.partition(".")[0]

    def run(msg: Message, context: Context) -> Message:
        # Set where clients run, not at import: two simulated clients share two cores (one thread each avoids
        # oversubscription and keeps CPU results bit-for-bit reproducible), while the server process that
        # imports this module keeps all its threads for aggregation and evaluation.
        torch.set_num_threads(1)
        cfg = client_config(context.run_config)
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
    """A ClientApp with one route per message type of `client.handlers.HANDLER_MODULES`, wrapped by `mods`."""
    client_app = ClientApp(mods=mods)
    for message_type in HANDLER_MODULES:
        category, _, action = message_type.partition(".")
        getattr(client_app, category)(action or "default")(_route(message_type))
    return client_app


app = build_app()
