"""The server's round loop without Ray: a fake grid whose nodes run our client handlers in-process.

It checks what only the loop sees: discovery (a node claiming another's partition, too few nodes connecting),
a node that loses its mask or comes back with a new node id trains again, and a run that cannot train fails.
"""

from __future__ import annotations

import pytest
from flwr.app import Error, Message, RecordDict

from client.handlers import HANDLERS
from fedsparse.config import resolve
from fedsparse.results import read_rounds
from server.loop import TrainingFailed, run_federation

BASE = {"dataset": "digits", "model": "mlp", "num-clients": 3, "num-rounds": 3, "local-epochs": 1, "batch-size": 32,
        "partitioner": "iid", "strategy": "random", "sparsity": 0.5, "lr": 0.05}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class HandlerGrid:
    """Nodes {node id: partition id}, each with its own Context.state; `send_and_receive` runs our handlers.

    `before(message, grid)` runs first for every message and may return an Error reason, or "drop" (the reply
    never arrives), or None (handle it)."""

    def __init__(self, run_config: dict, nodes: dict[int, int], before=None) -> None:
        self.cfg = resolve(run_config)
        self.nodes = dict(nodes)
        self.states = {n: RecordDict() for n in nodes}
        self.before = before
        self.log: list[tuple[int, str]] = []  # (node id, message type) of every message handled

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            verdict = self.before(m, self) if self.before else None
            if verdict == "drop" or node not in self.nodes:
                continue
            self.log.append((node, m.metadata.message_type))
            try:
                if verdict is not None:
                    raise RuntimeError(verdict)
                content = HANDLERS[m.metadata.message_type](m.content, self.states[node], self.cfg, self.nodes[node])
                replies.append(Message(content, reply_to=m))
            except Exception as err:  # noqa: BLE001  (as Flower: any client exception is an error reply)
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=m))
        return replies


def run(tmp_path, grid: HandlerGrid, **overrides) -> dict:
    cfg = {**BASE, "output-dir": str(tmp_path / "out"), **overrides}
    grid.cfg = resolve(cfg)
    return run_federation(grid, cfg)


def train_round(message) -> int:
    return int(message.content["config"]["server-round"]) if message.metadata.message_type == "train" else 0


def test_a_node_that_lost_its_mask_gets_it_again_and_trains(task_identity, tmp_path):
    def lose_mask(message, grid):
        if message.metadata.dst_node_id == 12 and train_round(message) == 2:
            grid.states[12] = RecordDict()  # the node restarted: its Context.state is gone

    grid = HandlerGrid(BASE, {11: 0, 12: 1, 13: 2}, lose_mask)
    summary = run(tmp_path, grid)
    assert [r["clients"] for r in read_rounds(tmp_path / "out" / "rounds.csv")] == [3, 2, 3]
    installs = [n for n, t in grid.log if t == "query.install_mask"]
    assert sorted(installs) == [11, 12, 12, 13]  # once each, then again for node 12 before round 3
    trains_of_12 = [i for i, (n, t) in enumerate(grid.log) if n == 12 and t == "train"]
    assert len(trains_of_12) == 3 and grid.log.index((12, "query.install_mask"), trains_of_12[1]) < trains_of_12[2]
    failures = summary["failures"]
    assert len(failures) == 1 and failures[0]["node_id"] == 12 and "no installed mask matches" in failures[0]["reason"]
    assert failures[0]["round"] == 2


def test_a_node_back_with_a_new_id_takes_over_its_partition(task_identity, tmp_path):
    def restart(message, grid):
        if message.metadata.dst_node_id == 12 and train_round(message) == 2:
            del grid.nodes[12]  # node 12 dies during round 2 and comes back as node 99, state gone
            grid.nodes[99] = 1
            grid.states[99] = RecordDict()
            return "drop"
        return None

    grid = HandlerGrid(BASE, {11: 0, 12: 1, 13: 2}, restart)
    summary = run(tmp_path, grid, **{"round-timeout": 1.0})
    assert [(n, t) for n, t in grid.log if n == 99] == [(99, "query.info"), (99, "query.install_mask"), (99, "train")]
    reasons = [(f["node_id"], f["reason"]) for f in summary["failures"]]
    assert reasons == [(12, "no reply within round-timeout (1 s)")]
    assert summary["rounds"] == 3


def test_a_node_claiming_a_taken_partition_is_dropped_and_recorded(task_identity, tmp_path):
    grid = HandlerGrid(BASE, {11: 0, 12: 1, 13: 2, 14: 1})  # node 14 claims node 12's partition
    summary = run(tmp_path, grid, **{"num-rounds": 1})
    dropped = [f for f in summary["failures"] if f["node_id"] == 14]
    assert len(dropped) == 1 and "claims partition 1, already held by node 12" in dropped[0]["reason"]
    assert (14, "train") not in grid.log and summary["rounds"] == 1


def test_too_few_nodes_fail_within_the_connect_timeout(task_identity, tmp_path):
    grid = HandlerGrid(BASE, {11: 0, 12: 1})
    with pytest.raises(RuntimeError, match=r"only 2 of 3 clients connected within connect-timeout \(1 s\)"):
        run(tmp_path, grid, **{"connect-timeout": 1.0})


def test_a_run_whose_every_reply_is_rejected_fails(task_identity, tmp_path, monkeypatch):
    original = HANDLERS["train"]

    def liar(content, state, cfg, partition_id):  # every client claims 10**18 examples
        reply = original(content, state, cfg, partition_id)
        reply["metrics"]["num-examples"] = 10**18
        return reply

    monkeypatch.setitem(HANDLERS, "train", liar)
    grid = HandlerGrid(BASE, {11: 0, 12: 1, 13: 2})
    with pytest.raises(TrainingFailed, match="round 1: none of the 3 train replies was accepted"):
        run(tmp_path, grid)
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("breakage,reason", [
    ("nan-partition", "'partition-id' must be an integer, got float nan"),
    ("partition-out-of-range", "'partition-id' is 3, outside [0, 2]"),
    ("huge-num-examples", "'num-examples' is 1000000000000000000, outside [1, 1442]"),
    ("metrics-as-config", "record 'metrics' is a ConfigRecord"),
])
def test_a_malformed_info_reply_drops_only_that_node(task_identity, tmp_path, monkeypatch, breakage, reason):
    from flwr.app import ConfigRecord

    original = HANDLERS["query.info"]

    def broken(content, state, cfg, partition_id):
        reply = original(content, state, cfg, partition_id)
        if partition_id == 2:  # node 14 below
            metrics = reply["metrics"]
            if breakage == "nan-partition":
                metrics["partition-id"] = float("nan")
            elif breakage == "partition-out-of-range":
                metrics["partition-id"] = 3
            elif breakage == "huge-num-examples":
                metrics["num-examples"] = 10**18
            else:
                reply["metrics"] = ConfigRecord(dict(metrics.items()))
        return reply

    monkeypatch.setitem(HANDLERS, "query.info", broken)
    grid = HandlerGrid(BASE, {11: 0, 12: 1, 14: 2})
    summary = run(tmp_path, grid, **{"num-rounds": 1, "min-clients": 2})
    [failure] = summary["failures"]
    assert failure["node_id"] == 14 and failure["reason"].startswith(f"dropped node: {reason}")
    assert (14, "train") not in grid.log and summary["rounds"] == 1


@pytest.mark.parametrize("strategy", ["fedavg", "ssfl", "random", "magnitude", "topk"])
def test_every_strategy_runs_clean_through_the_loop(task_identity, tmp_path, strategy):
    grid = HandlerGrid(BASE, {11: 0, 12: 1, 13: 2})
    summary = run(tmp_path, grid, strategy=strategy, **{"num-rounds": 2, "warmup-rounds": 1})
    assert summary["failures"] == [] and summary["rounds"] == 2
    assert [r["clients"] for r in read_rounds(tmp_path / "out" / "rounds.csv")] == [3, 3]
