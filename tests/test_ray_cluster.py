"""`fedsparse run` attached (RAY_ADDRESS) to a Ray cluster of two nodes on this machine: Flower's actor pool spans
both nodes and clients run on each (README, "Past one machine").

`app` is our ClientApp behind `node_mod`, which appends one line per message to `<output-dir>/ray-nodes.log`: the
Ray node id of the actor that handled it, its process id, the partition id and the message type. A cluster's
workers get the environment of the node they run on, not the driver's, so the log goes to the run's output-dir
(a run-config key every client sees) rather than to a path in an environment variable; all nodes here share the
disk. Use it as `fedsparse run --client-app tests.test_ray_cluster:app`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from flwr.app import Context, Message

from client.client_app import build_app
from tests.conftest import fedsparse_run, summary

NODE_LOG = "ray-nodes.log"


def node_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    import ray

    reply = call_next(msg, context)
    line = (f"{ray.get_runtime_context().get_node_id()} {os.getpid()} {context.node_config['partition-id']} "
            f"{msg.metadata.message_type}\n")
    with open(Path(context.run_config["output-dir"]) / NODE_LOG, "a") as f:
        f.write(line)
    return reply


app = build_app([node_mod])


class HandledMessage(NamedTuple):
    """One line of the node log: who handled which message."""

    node: str
    pid: int
    partition: int
    message_type: str


def read_node_log(out: Path) -> list[HandledMessage]:
    """One entry per message a client handled, in the order they were logged."""
    rows = []
    for line in (out / NODE_LOG).read_text().splitlines():
        node, pid, partition, message_type = line.split()
        rows.append(HandledMessage(node, int(pid), int(partition), message_type))
    return rows


@pytest.mark.slow
def test_a_run_attached_to_a_two_node_cluster_runs_clients_on_both_nodes(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, num_gpus=0)
        cluster.wait_for_nodes()
        node_ids = {node.node_id for node in cluster.list_all_nodes()}
        assert len(node_ids) == 2
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        out = tmp_path / "run"
        fedsparse_run(out, "dataset=digits", "model=mlp", "num-clients=10", "fraction-train=0.5", "num-rounds=2",
                      "client-num-cpus=1", extra=("--client-app", "tests.test_ray_cluster:app"), timeout=300)
    finally:
        cluster.shutdown()
    rows = read_node_log(out)
    # one actor per node (1 CPU each, client-num-cpus=1), and each handled training messages
    assert {row.node for row in rows} == node_ids
    assert len({row.pid for row in rows}) == 2
    assert {row.node for row in rows if row.message_type == "train"} == node_ids
    assert summary(out)["final_accuracy"] >= 0.0
