"""Test-only fault injection: our ClientApp wrapped with a Flower mod that corrupts one partition's replies.

`app` is `client.client_app.build_app` with `fault_mod` around every handler. The mod reads the environment
variable `FEDSPARSE_TEST_FAULT="<partition-id>:<fault>"` when a message arrives (unset or empty: it does nothing),
so a simulation runs it with `fedsparse run --client-app tests.faults:app` (the variable reaches the Ray workers)
and a deployment with the SuperExec started under that variable.

Faults of a train reply (`TRAIN_FAULTS`): what a buggy or malicious client can send. `lose-mask` instead drops the
installed mask from the node's state before its round-2 train message, as a SuperNode that restarted would.
`steal-partition` makes the node's `query.info` reply claim partition 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.client_app import build_app

ENV = "FEDSPARSE_TEST_FAULT"
TRAIN_FAULTS = ("wrong-length", "wrong-dtype", "nan", "missing-key", "stale-fingerprint", "huge-num-examples",
                "huge-update", "stale-round", "nan-partition-id", "loss-not-number", "metrics-as-config",
                "arrays-not-arrayrecord")
OTHER_FAULTS = ("lose-mask", "steal-partition")


def parse_fault(spec: str) -> tuple[int, str] | None:
    """`"<partition-id>:<fault>"` -> (partition id, fault); None for an empty spec. ValueError if malformed."""
    if not spec:
        return None
    pid, sep, fault = spec.partition(":")
    if not sep or not pid.strip().lstrip("-").isdigit() or fault not in TRAIN_FAULTS + OTHER_FAULTS:
        raise ValueError(f"{ENV} must be '<partition-id>:<fault>' with a fault in "
                         f"{', '.join(TRAIN_FAULTS + OTHER_FAULTS)}; got {spec!r}")
    return int(pid), fault


def corrupt_reply(reply: RecordDict, fault: str) -> None:
    """Break a train reply (values/dense payload) the way a buggy or malicious client would."""
    arrays = reply["arrays"]
    if fault == "wrong-length":
        values = arrays["values"].numpy()
        arrays["values"] = Array(np.concatenate([values, values[:1]]))
    elif fault == "wrong-dtype":
        arrays["values"] = Array(arrays["values"].numpy().astype(np.float64))
    elif fault == "nan":
        values = arrays["values"].numpy()
        if values.dtype == np.uint16:  # bfloat16 words: 0x7FC0 is a NaN
            arrays["values"] = Array(np.full_like(values, 0x7FC0))
        else:
            bad = values.copy()
            bad[0] = np.nan
            arrays["values"] = Array(bad)
    elif fault == "missing-key":
        del arrays["values"]
    elif fault == "stale-fingerprint":
        reply["config"]["mask-fingerprint"] = "0000000000000000"
    elif fault == "huge-num-examples":
        reply["metrics"]["num-examples"] = 10**18
    elif fault == "huge-update":
        for key in list(arrays.keys()):
            data = arrays[key].numpy()
            if data.dtype != np.uint16:  # the largest finite value of the wire dtype, everywhere
                arrays[key] = Array(np.full_like(data, np.finfo(data.dtype).max * 0.9))
    elif fault == "stale-round":
        reply["config"]["server-round"] = int(reply["config"]["server-round"]) - 1
    elif fault == "nan-partition-id":
        reply["metrics"]["partition-id"] = float("nan")
    elif fault == "loss-not-number":
        reply["metrics"]["train-loss"] = [1.0, 2.0]
    elif fault == "metrics-as-config":
        reply["metrics"] = ConfigRecord(dict(reply["metrics"].items()))
    elif fault == "arrays-not-arrayrecord":
        reply["arrays"] = MetricRecord({"values": 1.0})
    else:
        raise ValueError(f"unknown train fault {fault!r}; known: {', '.join(TRAIN_FAULTS)}")


def fault_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod: apply the fault of `FEDSPARSE_TEST_FAULT` to the messages of its partition."""
    parsed = parse_fault(os.environ.get(ENV, ""))
    if parsed is None or int(context.node_config["partition-id"]) != parsed[0]:
        return call_next(msg, context)
    fault = parsed[1]
    message_type = msg.metadata.message_type
    if fault == "lose-mask" and message_type == "train" and int(msg.content["config"]["server-round"]) == 2:
        for key in ("mask", "mask-info"):
            if key in context.state:
                del context.state[key]
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if fault in TRAIN_FAULTS and message_type.startswith("train"):
        corrupt_reply(reply.content, fault)
    elif fault == "steal-partition" and message_type == "query.info":
        reply.content["metrics"]["partition-id"] = 0
    return reply


app = build_app([fault_mod])
