"""The floor of a deployed round: a ClientApp whose train messages cost nothing but Flower's own work.

`simulations/bench_deploy_round.py` runs the same deployment and the same SSFL run with this ClientApp in place of
`client.client_app:app`: a train message is answered with a zero update of the received payload's shape (the
round, the mask fingerprint and the metrics echoed as our ClientApp does), importing flwr and numpy only, so a
round's time is Flower's alone (a `flwr-clientapp` process start per message and the polling of SuperExec,
SuperNode and ServerApp). The one-off queries of the first round (discovery, saliency, mask install) go to our
real ClientApp, imported only in the processes that answer them, so the server's run goes through.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

NO_MASK = "dense"  # fedsparse.sparse.NO_MASK, repeated here so that a train message imports nothing of ours

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A zero update of the received payload's arrays, with the reply's config and metrics as the server checks."""
    payload = msg.content["arrays"]
    config = msg.content["config"]
    zeros = ArrayRecord({name: Array(np.zeros_like(payload[name].numpy())) for name in payload})
    metrics = MetricRecord({"num-examples": 1, "train-loss": 0.0,
                            "partition-id": int(context.node_config["partition-id"])})
    echo = ConfigRecord({"mask-fingerprint": str(config.get("mask-fingerprint", NO_MASK)),
                         "server-round": int(config["server-round"])})
    return Message(RecordDict({"arrays": zeros, "metrics": metrics, "config": echo}), reply_to=msg)


def _ours(msg: Message, context: Context) -> Message:
    from client.client_app import app as ours

    return ours(msg, context)


for _action in ("info", "saliency", "install_mask"):
    app.query(_action)(_ours)
