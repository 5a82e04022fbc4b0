"""The continual experiment: one phase of FedAvg rounds per task of a stream, with a continual method.

`ContinualExperiment(cfg)` (registered as EXPERIMENTS["continual"]; `build_continual(cfg)` makes one) has one
`Phase` per task of `cl.stream`, each of `cl.rounds-per-task` rounds of a fresh `ContinualFedAvg` (FedAvg whose
train messages are `train.continual` and carry the run's round), evaluated after every round on every task seen so far
(`acc/<task>`, `loss/<task>`; the current task's evaluator first, so `test_accuracy` follows it). The method
`cl.method` decides the hooks:
- `finetune`: none (plain FedAvg through the tasks).
- `sfa`: server-side SFA on the global model (`ServerSFA`): `on_start` takes the global model as the anchor,
  `after_round` averages theta <- (1 - beta) theta + beta anchor after every max(1, round(p R)) rounds of a task of
  R rounds and at its last round (not during the first task).
- `sfa-client`, `l2`, `ewc`: `on_start` installs the anchor (the global model at the task's start, i.e. the previous
  task's final model) on every client with `query.cl_anchor` (ewc: with the aggregated Fisher); the clients'
  procedure (`fedsparse.continual.procedure`) averages or penalises against it. For ewc, `on_end` asks every client
  for its diagonal Fisher on the task's data (`query.cl_fisher`), averages them weighted by examples and adds the
  result to the Fishers of the earlier tasks (online EWC).
- `replay`: nothing on the server; each client keeps its own buffer of past-task examples.
- `merge-ta`, `merge-ties`, `wise-ft` ("merge after each task", `fedsparse.continual.merge_after_task`): the clients
  fine-tune; `on_start` tells the `TaskMerger` the task's start model (the first one is theta_0), and `after_round`
  of a task's last round replaces the trained global model with the merge (Task Arithmetic / TIES of every per-task
  model against theta_0, or WiSE-FT with the task's start), from the second task on; evaluated after the merge.
All one-off exchanges go through the phase's (counting) grid, so their bytes are in the run's accounting.

`finish` reads the accuracy matrix R[i][j] (after task i, on task j) off the last round of every phase and writes
`accuracy_matrix.csv` and `accuracy_matrix.png`; the summary gains average accuracy, average forgetting and backward
transfer. A centralised run is the same experiment with `num-clients = 1`.

Invariants: the experiment's state (the SFA anchor and schedule position, the accumulated Fisher, the merger's
theta_0 and per-task models) is in
`state_dict()`, so a resumed run continues exactly; the anchor of task i is the global model as it was when task i
started, which is task i-1's final (already averaged) model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsparse import replies
from fedsparse.config import ConfigError
from fedsparse.continual.merge_after_task import MERGE_AFTER_TASK_METHODS, TaskMergeConfig, TaskMerger
from fedsparse.continual.metrics import plot_matrix, summarize, write_matrix_csv
from fedsparse.continual.penalties import FisherEstimate, accumulate_fisher, aggregate_fishers
from fedsparse.continual.procedure import ANCHOR_METHODS, check_method
from fedsparse.continual.sfa import ServerSFA, SFAConfig
from fedsparse.data import load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.tasks import NUM_CLASSES, Task, stream_tasks
from fedsparse.train import evaluate, pick_device
from fedsparse.transport import ReplyError
from server.experiments import Phase, PhaseContext
from server.strategies.base import FedAvg

log = logging.getLogger("fedsparse")

TRAIN_MESSAGE = "train.continual"  # client.continual.TRAIN_MESSAGE
ANCHOR_MESSAGE = "query.cl_anchor"
FISHER_MESSAGE = "query.cl_fisher"
MATRIX_CSV = "accuracy_matrix.csv"
MATRIX_PNG = "accuracy_matrix.png"


class ContinualError(RuntimeError):
    """A continual exchange failed in a way the run cannot go on from; `reason` says which and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class TaskEvaluator:
    """Central evaluation on one task's test set: {"acc/<task>": accuracy, "loss/<task>": mean cross-entropy}."""

    task: Task
    device: torch.device

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """Accuracy and loss of `model` on the task's test set."""
        loss, accuracy = evaluate(model, self.task.x_test, self.task.y_test, device=self.device)
        return {f"acc/{self.task.name}": accuracy, f"loss/{self.task.name}": loss}


def state_of(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord of a model's state as a torch state dict."""
    return arrays.to_torch_state_dict()


def check_continual_config(cfg: dict, tasks: list[Task]) -> None:
    """ConfigError when the run's settings cannot host the stream: another strategy than fedavg, or a dataset
    whose input shape (which the clients build their model from) is not the stream's."""
    if cfg["strategy"] != "fedavg":
        raise ConfigError(f"config key 'strategy': the continual experiment runs fedavg, got {cfg['strategy']!r}")
    shape = load_dataset(cfg["dataset"], cfg["data-root"]).input_shape
    if tuple(shape) != tasks[0].input_shape:
        raise ConfigError(f"config key 'dataset': {cfg['dataset']!r} has input shape {tuple(shape)}, stream "
                          f"{cfg['cl.stream']!r} has {tasks[0].input_shape}; set dataset to one of that shape "
                          "(fashion-mnist for the 28x28 streams, digits for the digits streams)")


def read_fisher_reply(content: RecordDict, keys: set[str], shapes: dict[str, tuple[int, ...]]) -> FisherEstimate:
    """A `query.cl_fisher` reply: the record `fisher` with one finite, non-negative array per trainable
    parameter, and `num-examples` >= 1 in `metrics`. ReplyError names what is wrong."""
    fisher = replies.get_record(content, "fisher", ArrayRecord)
    metrics = replies.get_record(content, "metrics", MetricRecord)
    count = replies.get_int(metrics, "num-examples", 1, 2**62)
    if set(fisher) != keys:
        raise ReplyError(f"Fisher covers {sorted(set(fisher))[:3]}..., expected the model's trainable parameters")
    diagonal = {}
    for key in sorted(keys):
        value = torch.from_numpy(np.array(fisher[key].numpy(), dtype=np.float32, copy=True))
        if tuple(value.shape) != shapes[key]:
            raise ReplyError(f"Fisher '{key}' has shape {tuple(value.shape)}, expected {shapes[key]}")
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ReplyError(f"Fisher '{key}' has negative or non-finite entries")
        diagonal[key] = value
    return FisherEstimate(diagonal, count)


class ContinualFedAvg(FedAvg):
    """FedAvg whose train messages are `train.continual`: the client trains with the continual method's procedure
    (`client.continual.continual_train`); aggregation, validation and byte accounting are FedAvg's.

    Its rounds are the run's (the runner numbers a strategy's rounds across phases), so the clients' state
    snapshots (`client.state`), keyed by the train message's round, never see it go back at a new task, and client
    sampling and seeds differ from task to task."""

    message_type = TRAIN_MESSAGE


class ContinualExperiment:
    """The phases of a continual run and the server-side state of its method (see the module docstring).

    `model` is the architecture at its initial weights for the stream's input shape (the runner starts from it);
    `tasks` the stream's tasks in order; `strategy_factory(cfg, maskable)` makes each phase's strategy
    (default `ContinualFedAvg.from_config`)."""

    config_namespaces: frozenset[str] = frozenset({"cl"})

    def __init__(self, cfg: dict, *, strategy_factory: Callable[[dict, list[str]], FedAvg] | None = None
                 ) -> None:
        self.cfg = cfg
        self.tasks: list[Task] = self.check_config(cfg)
        device = pick_device(cfg["device"])
        self.model: torch.nn.Module = build_model(cfg["model"], self.tasks[0].input_shape, NUM_CLASSES,
                                                  seed=cfg["seed"])
        maskable = list(maskable_names(self.model, tuple(cfg["sparse.mask-layers"].split(","))))
        factory = strategy_factory or ContinualFedAvg.from_config
        self.sfa: ServerSFA | None = None
        if cfg["cl.method"] == "sfa":
            self.sfa = ServerSFA(SFAConfig(beta=cfg["cl.sfa-beta"], p=cfg["cl.sfa-p"]))
        self.merger: TaskMerger | None = None
        if cfg["cl.method"] in MERGE_AFTER_TASK_METHODS:
            self.merger = TaskMerger(TaskMergeConfig(cfg["cl.method"], alpha=cfg["cl.merge-alpha"],
                                                     scale=cfg["cl.merge-lambda"], density=cfg["cl.merge-density"]))
        self.fisher: FisherEstimate | None = None  # the sum of the aggregated Fishers of the finished tasks (ewc)
        self.phases: list[Phase] = []
        first_round = 1
        for index, task in enumerate(self.tasks):
            seen = [task, *self.tasks[:index]]  # the current task first: it is test_accuracy's evaluator
            self.phases.append(Phase(
                name=f"task-{index + 1}:{task.name.partition(':')[2]}", task=task.name,
                rounds=cfg["cl.rounds-per-task"], strategy=factory(cfg, maskable),
                evaluators=[TaskEvaluator(seen_task, device) for seen_task in seen],
                client_config={"cl-task-index": index, "cl-first-round": first_round},
                on_start=self.on_start, after_round=self.after_round, on_end=self.on_end))
            first_round += cfg["cl.rounds-per-task"]

    @staticmethod
    def check_config(cfg: dict) -> list[Task]:
        """The stream's tasks; ConfigError naming the key when the settings cannot host them (the method, the
        strategy, the dataset's input shape, `num-rounds` = tasks x `cl.rounds-per-task`). `fedsparse run` calls it
        before Ray starts."""
        check_method(cfg["cl.method"])
        tasks = stream_tasks(cfg["cl.stream"], cfg)
        check_continual_config(cfg, tasks)
        wanted = len(tasks) * cfg["cl.rounds-per-task"]
        if cfg["num-rounds"] != wanted:
            raise ConfigError(f"config key 'num-rounds': the {cfg['cl.stream']} stream has {len(tasks)} tasks of "
                              f"cl.rounds-per-task={cfg['cl.rounds-per-task']} rounds: set num-rounds={wanted} "
                              f"(got {cfg['num-rounds']})")
        return tasks

    @property
    def method(self) -> str:
        """The continual method, `cl.method`."""
        return self.cfg["cl.method"]

    # ----------------------------------------------------------------------------------------------- hooks

    def on_start(self, ctx: PhaseContext) -> None:
        """A task starts from the global model `ctx.arrays`: it becomes the anchor (server-side SFA), or is
        installed on the clients with the Fisher (sfa-client, l2, ewc), or is the merger's task start (merge-ta,
        merge-ties, wise-ft; the first task's start is theta_0). Nothing else for the first task."""
        if self.merger is not None:
            self.merger.start_task(state_of(ctx.arrays))
        if ctx.phase_index == 0:
            if self.sfa is not None:  # the first task is not averaged, but the schedule still counts it
                self.sfa.start_task(state_of(ctx.arrays), self.phases[0].rounds)
            return
        if self.sfa is not None:
            self.sfa.start_task(state_of(ctx.arrays), self.phases[ctx.phase_index].rounds)
        if self.method in ANCHOR_METHODS:
            self.install_anchor(ctx)

    def install_anchor(self, ctx: PhaseContext) -> None:
        """Send the anchor (and, for ewc, the Fisher) to every known client; a client that does not confirm
        trains this task without it (logged)."""
        task = self.phases[ctx.phase_index].task
        content = RecordDict({"anchor": ctx.arrays, "config": ConfigRecord({"task": task})})
        if self.method == "ewc":
            if self.fisher is None:
                raise ContinualError(f"ewc: no Fisher was aggregated before task {task!r}")
            content["fisher"] = ArrayRecord(dict(self.fisher.diagonal))
            content["config"]["fisher-examples"] = self.fisher.num_examples
        answers = self._ask(ctx, content, ANCHOR_MESSAGE)
        confirmed = 0
        for node_id, reply in answers.items():
            try:
                got = replies.get_str(replies.get_record(reply, "config", ConfigRecord), "task")
                if got != task:
                    raise ReplyError(f"installed the anchor for task {got!r}, not {task!r}")
                confirmed += 1
            except ReplyError as err:
                log.warning("node %s did not install the anchor of %s: %s", node_id, task, err)
        log.info("anchor of %s installed on %d of %d clients", task, confirmed, len(ctx.nodes))

    def after_round(self, ctx: PhaseContext, phase_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Server-side SFA after round `phase_round` (1-based within the task): the aggregated global model,
        averaged with the anchor when the schedule says so. Merge after each task: after the task's last round,
        the merge of the trained global model with what the merger keeps."""
        if self.merger is not None and phase_round == self.phases[ctx.phase_index].rounds:
            return ArrayRecord(self.merger.end_task(state_of(arrays)))
        if self.sfa is None:
            return arrays
        current = state_of(arrays)
        averaged = self.sfa.after_round(phase_round, current)
        return arrays if averaged is current else ArrayRecord(averaged)

    def on_end(self, ctx: PhaseContext) -> None:
        """ewc: the clients' Fishers of the task that ended, aggregated and added to the earlier ones (not after
        the last task, where nothing would use it)."""
        if self.method != "ewc" or ctx.phase_index == len(self.phases) - 1:
            return
        model = ctx.model
        trainable = {name: tuple(param.shape) for name, param in model.named_parameters() if param.requires_grad}
        task = self.phases[ctx.phase_index].task
        content = RecordDict({"model": ctx.arrays, "config": ConfigRecord(
            {"task": task, "fisher-examples": self.cfg["cl.fisher-examples"]})})
        estimates = []
        for node_id, reply in sorted(self._ask(ctx, content, FISHER_MESSAGE).items()):
            try:
                estimates.append(read_fisher_reply(reply, set(trainable), trainable))
            except ReplyError as err:
                log.warning("node %s: Fisher of %s rejected: %s", node_id, task, err)
        if not estimates:
            raise ContinualError(f"ewc: no client sent a valid Fisher for task {task!r}")
        self.fisher = accumulate_fisher(self.fisher, aggregate_fishers(estimates))
        log.info("Fisher of %s aggregated over %d clients (%d examples)", task, len(estimates),
                 sum(e.num_examples for e in estimates))

    def _ask(self, ctx: PhaseContext, content: RecordDict, message_type: str) -> dict[int, RecordDict]:
        """Send `content` to every known client as `message_type`; {node id: reply content} of the replies that
        carry no error (the others are logged)."""
        nodes = [ctx.nodes[partition] for partition in sorted(ctx.nodes)]
        return ctx.exchange([Message(content, dst_node_id=node, message_type=message_type) for node in nodes])

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The method's server-side state, for the checkpoint."""
        fisher = None if self.fisher is None else {"diagonal": self.fisher.diagonal,
                                                   "num_examples": self.fisher.num_examples}
        return {"sfa": None if self.sfa is None else self.sfa.state_dict(), "fisher": fisher,
                "merge": None if self.merger is None else self.merger.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        if self.sfa is not None and state.get("sfa") is not None:
            self.sfa.load_state_dict(state["sfa"])
        if self.merger is not None and state.get("merge") is not None:
            self.merger.load_state_dict(state["merge"])
        saved = state.get("fisher")
        self.fisher = None if saved is None else FisherEstimate(
            {key: value.clone() for key, value in saved["diagonal"].items()}, int(saved["num_examples"]))

    # ------------------------------------------------------------------------------------------ results

    def accuracy_matrix(self, rows: list[dict]) -> np.ndarray:
        """R[i][j]: `acc/<task j>` at the last round of phase i (NaN for a task not evaluated then, i.e. j > i,
        or a phase that has not run)."""
        names = [task.name for task in self.tasks]
        matrix = np.full((len(self.phases), len(names)), np.nan)
        for index, phase in enumerate(self.phases):
            last = [row for row in rows if row.get("phase") == phase.name]
            if not last:
                continue
            for column, name in enumerate(names):
                value = last[-1].get(f"acc/{name}")
                if value is not None and value != "" and math.isfinite(float(value)):
                    matrix[index, column] = float(value)
        return matrix

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """Write the accuracy matrix (CSV and heat map); return the summary entries of a continual run."""
        matrix = self.accuracy_matrix(rows)
        names = [task.name for task in self.tasks]
        out_dir = Path(out_dir)
        extra: dict = {"cl_method": self.method, "cl_stream": self.cfg["cl.stream"], "cl_tasks": names,
                       "accuracy_matrix": [[None if math.isnan(v) else v for v in row] for row in matrix.tolist()]}
        if np.isnan(matrix[np.tril_indices(len(matrix))]).any():
            log.warning("the accuracy matrix is incomplete (the run stopped early): no continual metrics")
            return extra
        write_matrix_csv(out_dir / MATRIX_CSV, matrix, names)
        plot_matrix(out_dir / MATRIX_PNG, matrix, names, title=f"{self.method} on {self.cfg['cl.stream']}")
        summary = summarize(matrix)
        extra.update({"average_accuracy": summary.average_accuracy,
                      "average_forgetting": summary.average_forgetting,
                      "backward_transfer": summary.backward_transfer})
        return extra


def build_continual(cfg: dict) -> ContinualExperiment:
    """The continual experiment of the resolved run config `cfg` (EXPERIMENTS["continual"])."""
    return ContinualExperiment(cfg)
