"""The server's round loop without Ray: a fake grid whose nodes run our client handlers in-process.

It checks what only the loop sees: discovery (a node claiming another's partition, too few nodes connecting),
a node that loses its mask or comes back with a new node id trains again, and a run that cannot train fails.
"""

from __future__ import annotations

import json
from typing import ClassVar

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


STRATEGY_KEYS = {"fedavg": {}, "ssfl": {"sparsity": 0.5}, "random": {"sparsity": 0.5},
                 "magnitude": {"sparsity": 0.5, "warmup-rounds": 1}, "topk": {}}


@pytest.mark.parametrize("strategy", ["fedavg", "ssfl", "random", "magnitude", "topk"])
def test_every_strategy_runs_clean_through_the_loop(task_identity, tmp_path, strategy):
    settings = {k: v for k, v in BASE.items() if k != "sparsity"}
    grid = HandlerGrid(settings, {11: 0, 12: 1, 13: 2})
    summary = run_with(tmp_path, grid, settings, strategy=strategy, **{"num-rounds": 2, **STRATEGY_KEYS[strategy]})
    assert summary["failures"] == [] and summary["rounds"] == 2
    rows = read_rounds(tmp_path / "out" / "rounds.csv")
    assert [r["clients"] for r in rows] == [3, 3] and [r["phase"] for r in rows] == ["train", "train"]
    assert all(r["acc/digits"] == r["test_accuracy"] and r["loss/digits"] == r["test_loss"] for r in rows)
    assert [p["name"] for p in summary["phases"]] == ["train"] and summary["phases"][0]["rounds"] == 2
    assert summary["phases"][0]["bytes_up"] == summary["bytes_up"] > 0


def run_with(tmp_path, grid: HandlerGrid, settings: dict, **overrides) -> dict:
    cfg = {**settings, "output-dir": str(tmp_path / "out"), **overrides}
    grid.cfg = resolve(cfg)
    return run_federation(grid, cfg)


class TwoPhases:
    """A test experiment: 2 rounds of FedAvg on digits, then 1 round of a fresh FedAvg whose clients get an extra
    config entry; the hooks record what they saw, `after_round` halves the model of phase 2, a query.* exchange
    in `on_end` of phase 1 counts as one-off traffic."""

    config_namespaces = frozenset()
    made: ClassVar[list[TwoPhases]] = []

    def __init__(self, cfg: dict) -> None:
        TwoPhases.made.append(self)
        from fedsparse.data import load_dataset
        from fedsparse.models import build_model, maskable_names
        from server.experiments import Phase, TestSetEvaluator
        from server.strategies import FedAvg

        data = load_dataset("digits")
        self.model = build_model(cfg["model"], data.input_shape, data.num_classes, seed=cfg["seed"])
        names = maskable_names(self.model)
        evaluator = TestSetEvaluator("digits", data.x_test, data.y_test)
        half = TestSetEvaluator("half", data.x_test[: len(data.x_test) // 2], data.y_test[: len(data.y_test) // 2])
        self.seen: list[tuple] = []
        self.halved: dict = {}
        self.phases = [
            Phase("first", "digits", 2, FedAvg.from_config(cfg, names), [evaluator],
                  on_start=lambda ctx: self.seen.append(("start", ctx.phase_index, sorted(ctx.nodes))),
                  on_end=self.ask_info),
            Phase("second", "digits", 1, FedAvg.from_config(cfg, names), [half, evaluator],
                  client_config={"procedure": "plain"},
                  on_start=lambda ctx: self.seen.append(("start", ctx.phase_index, sorted(ctx.nodes))),
                  after_round=self.halve),
        ]

    def ask_info(self, ctx) -> None:
        messages = [Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in ctx.nodes.values()]
        replies = list(ctx.grid.send_and_receive(messages, timeout=ctx.timeout))
        self.seen.append(("end", ctx.phase_index, len(replies)))

    def halve(self, ctx, phase_round, arrays):
        from flwr.app import ArrayRecord

        self.halved = {k: v * 0.5 for k, v in arrays.to_torch_state_dict().items()}
        self.seen.append(("after", ctx.phase_index, phase_round))
        return ArrayRecord(self.halved)

    def state_dict(self) -> dict:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = list(state["seen"])

    def finish(self, out_dir, rows) -> dict:
        return {"two_phases_seen": [list(x) for x in self.seen]}


def test_an_experiment_runs_its_phases_with_their_hooks_and_columns(task_identity, tmp_path, monkeypatch):
    """Rounds are numbered over phases; hooks run in order (on_start, rounds, after_round, on_end); the second
    phase's evaluators add their columns; the client config reaches the train messages; the model after
    `after_round` is the one evaluated and saved; query.* traffic of a hook is one-off."""
    import torch

    from server import experiments

    monkeypatch.setitem(experiments.EXPERIMENTS, "two-phases", TwoPhases)
    settings = {k: v for k, v in BASE.items() if k != "sparsity"}
    sent_configs = []

    def record(message, grid):
        if message.metadata.message_type == "train":
            sent_configs.append(dict(message.content["config"]))

    grid = HandlerGrid(settings, {11: 0, 12: 1, 13: 2}, record)
    summary = run_with(tmp_path, grid, settings, strategy="fedavg", experiment="two-phases")
    experiment = TwoPhases.made[-1]
    rows = read_rounds(tmp_path / "out" / "rounds.csv")
    assert [(r["round"], r["phase"]) for r in rows] == [(1, "first"), (2, "first"), (3, "second")]
    assert summary["two_phases_seen"] == [["start", 0, [0, 1, 2]], ["end", 0, 3], ["start", 1, [0, 1, 2]],
                                          ["after", 1, 1]]
    assert [c["server-round"] for c in sent_configs] == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # the run's rounds, not the phase's
    assert [c.get("procedure") for c in sent_configs] == [None] * 6 + ["plain"] * 3
    assert "task" not in sent_configs[0]  # the task is the dataset: nothing extra on the wire
    assert rows[0]["acc/half"] != rows[0]["acc/half"] and rows[2]["acc/half"] == rows[2]["acc/half"]  # NaN, then set
    assert rows[2]["test_accuracy"] == rows[2]["acc/half"]  # the first evaluator's
    final = torch.load(tmp_path / "out" / "final_model.pt")
    assert list(final) == list(experiment.halved) and all(torch.equal(final[k], v) for k, v in experiment.halved.items())
    assert [p["name"] for p in summary["phases"]] == ["first", "second"]
    assert summary["phases"][1]["final"]["acc/half"] == rows[2]["acc/half"]
    # one-off: 3 x query.info at discovery of each phase's strategy + 3 in on_end; nothing of it in a round's bytes
    infos = [t for _, t in grid.log].count("query.info")
    assert infos == 9 and summary["bytes_oneoff"] > 0
    assert sum(r["bytes_down"] for r in rows) == summary["bytes_down"]


@pytest.mark.parametrize("strategy", ["ssfl", "magnitude", "topk"])
def test_a_server_restarted_after_round_2_ends_with_the_uninterrupted_model(task_identity, tmp_path, strategy):
    """The server stops after round 2 and resumes (checkpoint: model, rows, strategy state: the mask); the
    clients keep their state (top-k residual). Round 3 then gives the same model as a run that never stopped;
    the masked strategy re-installs its mask on the clients first."""
    import torch

    settings = {**{k: v for k, v in BASE.items() if k != "sparsity"}, "strategy": strategy,
                **STRATEGY_KEYS[strategy], "fraction-train": 0.67}
    whole = tmp_path / "whole"
    run_with(whole, HandlerGrid(settings, {11: 0, 12: 1, 13: 2}), settings)
    split = tmp_path / "split"
    grid = HandlerGrid(settings, {11: 0, 12: 1, 13: 2})
    run_with(split, grid, settings, **{"num-rounds": 2})
    installs_before = [t for _, t in grid.log].count("query.install_mask")
    summary = run_with(split, grid, settings, resume=True)
    assert summary["rounds"] == 3 and len(read_rounds(split / "out" / "rounds.csv")) == 3
    a, b = torch.load(whole / "out" / "final_model.pt"), torch.load(split / "out" / "final_model.pt")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    reinstalls = [t for _, t in grid.log].count("query.install_mask") - installs_before
    assert reinstalls == (3 if strategy != "topk" else 0)


def test_report_reads_rounds_csv_from_before_and_after_phases(tmp_path):
    """One reader for both formats: a file without `phase` (written before phases existed) and one with `phase`
    and evaluator columns, an empty cell (a metric not measured that round) read as NaN."""
    import math

    from fedsparse.results import ROUND_COLUMNS, comparison_table, read_rounds, write_rounds

    old = tmp_path / "old"
    old.mkdir()
    (old / "rounds.csv").write_text(",".join(ROUND_COLUMNS) + "\n1,2.5,0.5,2.0,10,20,8,16,3,0,1.5\n")
    new = tmp_path / "new"
    new.mkdir()
    row = dict(zip(ROUND_COLUMNS, [1, 2.5, 0.5, 2.0, 10, 20, 8, 16, 3, 0, 1.5], strict=True))
    write_rounds(new / "rounds.csv", [{**row, "phase": "task-1:mnist", "acc/mnist": 0.5},
                                      {**row, "round": 2, "phase": "task-2:usps", "acc/usps": 0.25}])
    assert read_rounds(old / "rounds.csv") == [{k: float(v) for k, v in row.items()}]
    first, second = read_rounds(new / "rounds.csv")
    assert first["phase"] == "task-1:mnist" and first["acc/mnist"] == 0.5 and math.isnan(first["acc/usps"])
    assert second["phase"] == "task-2:usps" and second["acc/usps"] == 0.25 and second["round"] == 2.0
    summary = {"strategy": "fedavg", "rounds": 1, "final_accuracy": 0.5, "best_accuracy": 0.5, "bytes_down": 10,
               "bytes_up": 20}
    for folder in (old, new):
        (folder / "summary.json").write_text(json.dumps(summary))
    from fedsparse.results import report

    table = report([old, new], tmp_path / "both.png")
    assert table == comparison_table([old, new]) and table.count("| fedavg |") == 2
    assert (tmp_path / "both.png").stat().st_size > 0
