"""The merge experiment: every client trains an expert on its own task; the server merges the experts.

`MergeExperiment(cfg)` (registered as EXPERIMENTS["merge"]) has one `Phase` of `merge.expert-rounds` rounds of an
`ExpertStrategy`: FedAvg whose train messages are `train.merge` and say "train your expert for
`merge.expert-epochs` epochs" (`client.merging.train_expert`). Client i holds task i of `merge.stream` (the first
`num-clients` tasks). Experts start from the shared initial model (`merge.local = true`) or each from its client's
own seed (`client.merging.expert_init_seed`; non-local), and continue from themselves in later rounds.

After every round (`after_round`) the server reads the experts back from the accepted replies (received model +
update), optionally weight-matches each to the first expert (`merge.align`: `fedsparse.alignment.weight_matching`;
the same permutation is applied to that expert's initial model), and merges them with `merge.method` (any of
`fedsparse.merging.MERGE_METHODS`, lambda `merge.lambda`, 0 = the method's own): task vectors are taken against the
mean of the (aligned) initial models, which is the shared model itself in a local run. The merged model becomes
the global model: the runner evaluates it on every task (`acc/<task>`, `loss/<task>`; the first task's are
`test_accuracy` / `test_loss`) and sends it in the next round. Each expert is also evaluated on its own task.

With `merge.tact`, after every merge the server sends the merged model to every client (`query.merge_tact`, one-off
traffic): each fits, on its calibration examples, the per-channel affines at `client.merging.tact_layers` that give
the merged model its expert's statistics, and replies them; the evaluator of task i then applies client i's
corrections while it scores the merged model (TACT: one correction per task, on the hidden layers only).

With `merge.task-heads` the classifier head (`client.merging.head_layer`, the last layer) is excluded from the merge:
the merged model keeps the base's head (the shared initial one, or the mean of the initial models' heads) and task
i is scored with expert i's own head (`heads`, taken from the aligned expert when `merge.align`, so it reads the
merged model's channel order). With TACT as well, task i gets its corrections on the hidden layers and its head.

`finish` adds to summary.json: the method, the setting, `expert_accuracy` and `merged_accuracy` per task,
`normalized_accuracy` (merged / expert) per task and its mean `normalized_accuracy_mean`.

Invariants: a train reply's bytes are counted as any round's (`bytes_down` / `bytes_up`); the experts' accuracies,
the TACT corrections and the per-task heads are in `state_dict()`, so a resumed run reports the same summary; a
merge never changes a head of an expert (with task heads, the evaluator of task i uses expert i's head tensors as
they came back); an expert whose reply was rejected is missing
from the merge of that round (logged), and the run fails if no expert came back.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.merging import (
    TACT_MESSAGE,
    TRAIN_MESSAGE,
    expert_init_state,
    head_layer,
    head_state,
    merge_tasks,
    tact_layers,
)
from fedsparse import replies, sparse
from fedsparse.alignment import apply_permutation, permutation_spec, weight_matching
from fedsparse.config import ConfigError
from fedsparse.data import load_dataset
from fedsparse.merging import merge_models, weighted_average
from fedsparse.merging.statistics import AffineHooks, ChannelAffine
from fedsparse.models import build_model, maskable_names
from fedsparse.tasks import NUM_CLASSES, Task
from fedsparse.train import evaluate, pick_device
from fedsparse.transport import ReplyError
from server.experiments import Phase, PhaseContext
from server.experiments.continual import TaskEvaluator
from server.strategies.base import ClientUpdate, FedAvg

log = logging.getLogger("fedsparse")

StateDict = dict[str, torch.Tensor]


class MergeFailed(RuntimeError):
    """The server has no expert to merge; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ExpertStrategy(FedAvg):
    """FedAvg whose train messages are `train.merge`; besides FedAvg's aggregate (which the experiment replaces by
    the merge) it keeps the round's experts: `experts[partition] = received model + accepted update`."""

    message_type = TRAIN_MESSAGE

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.experts: dict[int, StateDict] = {}
        self._accepted: list[ClientUpdate] = []

    def screen_norms(self, readable: list[tuple[int, ClientUpdate]]) -> list[ClientUpdate]:
        """FedAvg's screening; the accepted updates are kept for `aggregate_train`."""
        self._accepted = super().screen_norms(readable)
        return self._accepted

    def aggregate_train(self, server_round: int, replies: list[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregate, and the round's experts in `experts` (empty when none was accepted)."""
        plan = self.plans.get(server_round)
        self._accepted = []
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.experts = {}
        if plan is not None:
            values, dense = sparse.gather(plan.global_state, self.layout, None)
            for update in self._accepted:
                self.experts[update.partition_id] = sparse.scatter(values + update.values, dense + update.dense,
                                                                   self.layout, None)
        return arrays, metrics


class MergeExperiment:
    """The phase of a merge run and the experts' accuracies (see the module docstring)."""

    config_namespaces: frozenset[str] = frozenset({"merge"})

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.tasks: list[Task] = self.check_config(cfg)
        self.device = pick_device(cfg["device"])
        self.model: torch.nn.Module = build_model(cfg["model"], self.tasks[0].input_shape, NUM_CLASSES,
                                                  seed=cfg["seed"])
        self.initial: StateDict = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        maskable = list(maskable_names(self.model, tuple(cfg["sparse.mask-layers"].split(","))))
        self.strategy = ExpertStrategy.from_config(cfg, maskable)
        self.expert_accuracy: dict[str, float] = {}
        self.layers = tact_layers(self.model)
        self.head = head_layer(self.model)
        self.corrections: dict[str, dict[str, ChannelAffine]] = {}  # task -> layer -> affine (merge.tact)
        self.heads: dict[str, StateDict] = {}  # task -> its expert's head entries (merge.task-heads)
        self.permutations: dict[int, dict[str, torch.Tensor]] = {}  # partition -> its expert's alignment
        self.phases = [Phase(name="experts", task=cfg["merge.stream"], rounds=cfg["merge.expert-rounds"],
                             strategy=self.strategy,
                             evaluators=[CorrectedEvaluator(TaskEvaluator(task, self.device), self.layers,
                                                            self.corrections, self.heads) for task in self.tasks],
                             client_config={"expert-epochs": cfg["merge.expert-epochs"]},
                             after_round=self.after_round)]

    @staticmethod
    def check_config(cfg: dict) -> list[Task]:
        """The run's tasks (task i is client i's); ConfigError naming the key when the settings cannot host them:
        more clients than the stream has tasks, a strategy other than fedavg, fraction-train below 1, a dataset
        of another input shape than the stream's, num-rounds other than merge.expert-rounds, alignment of a model
        without a permutation spec."""
        if cfg["strategy"] != "fedavg":
            raise ConfigError(f"config key 'strategy': the merge experiment runs fedavg, got {cfg['strategy']!r}")
        if cfg["fraction-train"] != 1.0:
            raise ConfigError("config key 'fraction-train': every client trains its expert in every round: set 1.0 "
                              f"(got {cfg['fraction-train']})")
        if cfg["num-rounds"] != cfg["merge.expert-rounds"]:
            raise ConfigError(f"config key 'num-rounds': a merge run has merge.expert-rounds="
                              f"{cfg['merge.expert-rounds']} rounds: set num-rounds to that (got {cfg['num-rounds']})")
        try:
            tasks = merge_tasks(cfg)
        except ConfigError as err:
            raise ConfigError(f"config key 'num-clients': one client per task, and stream {cfg['merge.stream']!r} "
                              f"has fewer tasks than num-clients={cfg['num-clients']}") from err
        shape = load_dataset(cfg["dataset"], cfg["data-root"]).input_shape
        if tuple(shape) != tasks[0].input_shape:
            raise ConfigError(f"config key 'dataset': {cfg['dataset']!r} has input shape {tuple(shape)}, stream "
                              f"{cfg['merge.stream']!r} has {tasks[0].input_shape}; set dataset to one of that shape "
                              "(fashion-mnist for the 28x28 streams, digits for the digits streams)")
        if cfg["merge.align"]:
            from fedsparse.alignment import SPEC_BUILDERS

            if cfg["model"] not in SPEC_BUILDERS:
                raise ConfigError(f"config key 'merge.align': no permutation spec for model {cfg['model']!r} "
                                  f"(known: {', '.join(SPEC_BUILDERS)})")
        return tasks

    # ----------------------------------------------------------------------------------------------- merge

    def initial_state(self, partition_id: int) -> StateDict:
        """The model client `partition_id`'s expert started from: the shared one (local) or its own."""
        if self.cfg["merge.local"]:
            return self.initial
        return expert_init_state(self.cfg, partition_id, self.tasks[0].input_shape)

    def merge(self, experts: dict[int, StateDict]) -> StateDict:
        """The merged model of `experts` (partition -> state): aligned to the lowest partition's expert when
        `merge.align`, task vectors against the mean of the (aligned) initial models, merged by `merge.method`.
        With `merge.task-heads` the head is left out of the merge (the base's stays) and `heads` is set to each
        (aligned) expert's head; otherwise `heads` is emptied."""
        if not experts:
            raise MergeFailed("no expert came back to merge")
        order = sorted(experts)
        states = [experts[p] for p in order]
        inits = [self.initial_state(p) for p in order]
        self.permutations.clear()
        if self.cfg["merge.align"] and len(states) > 1:
            spec = permutation_spec(self.cfg["model"], self.model)
            for index in range(1, len(states)):
                found = weight_matching(spec, states[0], states[index], seed=self.cfg["seed"])
                states[index] = apply_permutation(spec, found.permutation, states[index])
                inits[index] = apply_permutation(spec, found.permutation, inits[index])
                self.permutations[order[index]] = found.permutation
        self.heads.clear()
        exclude: tuple[str, ...] = ()
        if self.cfg["merge.task-heads"]:
            exclude = (self.head,)
            self.heads.update({self.tasks[p].name: head_state(state, self.head) for p, state in zip(order, states)})
        local_base = self.cfg["merge.local"] and not self.cfg["merge.align"]
        base = self.initial if local_base else weighted_average(inits, [1.0 / len(inits)] * len(inits))
        scale = self.cfg["merge.lambda"] or None
        return merge_models(base, states, self.cfg["merge.method"], scale=scale, seed=self.cfg["seed"],
                            exclude=exclude)

    def after_round(self, ctx: PhaseContext, phase_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Replace FedAvg's aggregate by the merge of the round's experts; score each expert on its own task."""
        experts = self.strategy.experts
        missing = [p for p in range(len(self.tasks)) if p not in experts]
        if missing:
            log.warning("round %d: no expert from partitions %s; merging %d experts", phase_round, missing,
                        len(experts))
        for partition, state in experts.items():
            ctx.model.load_state_dict(state)
            task = self.tasks[partition]
            _, accuracy = evaluate(ctx.model, task.x_test, task.y_test, device=self.device)
            self.expert_accuracy[task.name] = accuracy
        merged = ArrayRecord(self.merge(experts))
        self.corrections.clear()
        if self.cfg["merge.tact"]:
            self.corrections.update(self.ask_corrections(ctx, merged))
        return merged

    def ask_corrections(self, ctx: PhaseContext, merged: ArrayRecord) -> dict[str, dict[str, ChannelAffine]]:
        """TACT: every client's corrections of the merged model for its task ({task: {layer: affine}}); a client
        that fails or replies a malformed record leaves its task uncorrected (logged)."""
        partitions = {node: partition for partition, node in ctx.nodes.items()}
        messages = [Message(self.tact_request(partitions[node], merged), dst_node_id=node, message_type=TACT_MESSAGE)
                    for node in sorted(partitions)]
        found: dict[str, dict[str, ChannelAffine]] = {}
        for node, content in sorted(ctx.exchange(messages).items()):
            try:
                found[self.tasks[partitions[node]].name] = self.read_corrections(content)
            except (ReplyError, KeyError) as err:
                log.warning("node %s: TACT corrections rejected: %s", node, err)
        return found

    def tact_request(self, partition_id: int, merged: ArrayRecord) -> RecordDict:
        """The content of the `query.merge_tact` message to client `partition_id` about the last `merge`: the merged
        model, the calibration size and, when that client's expert was aligned, its permutation."""
        content = RecordDict({"model": merged, "config": ConfigRecord(
            {"tact-examples": self.cfg["merge.tact-examples"]})})
        permutation = self.permutations.get(partition_id)
        if permutation is not None:  # the client's expert in the merged model's channel order
            content["permutation"] = ArrayRecord({name: Array(index.numpy().astype(np.int64))
                                                  for name, index in permutation.items()})
        return content

    def read_corrections(self, content: RecordDict) -> dict[str, ChannelAffine]:
        """The `corrections` record of a `query.merge_tact` reply: finite scale and shift per TACT layer, one
        value per channel of that layer; ReplyError names what is wrong."""
        record = replies.get_record(content, "corrections", ArrayRecord)
        channels = {name: int(module.weight.shape[0]) for name, module in self.model.named_modules()
                    if name in self.layers}
        wanted = {f"{layer}.{part}" for layer in self.layers for part in ("scale", "shift")}
        if set(record) != wanted:
            raise ReplyError(f"corrections cover {sorted(record)[:4]}, expected {sorted(wanted)[:4]}")
        corrections = {}
        for layer in self.layers:
            scale, shift = (torch.from_numpy(np.array(record[f"{layer}.{part}"].numpy(), dtype=np.float32))
                            for part in ("scale", "shift"))
            if scale.shape != (channels[layer],) or shift.shape != (channels[layer],):
                raise ReplyError(f"layer '{layer}': corrections of shape {tuple(scale.shape)}, expected "
                                 f"({channels[layer]},)")
            if not (torch.isfinite(scale).all() and torch.isfinite(shift).all()):
                raise ReplyError(f"layer '{layer}': non-finite corrections")
            corrections[layer] = ChannelAffine(scale, shift)
        return corrections

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The experts' accuracies on their tasks, the TACT corrections and the per-task heads (the last round's)."""
        corrections = {task: {layer: (affine.scale, affine.shift) for layer, affine in layers.items()}
                       for task, layers in self.corrections.items()}
        heads = {task: dict(head) for task, head in self.heads.items()}
        return {"expert_accuracy": dict(self.expert_accuracy), "corrections": corrections, "heads": heads}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        self.expert_accuracy = dict(state.get("expert_accuracy", {}))
        self.corrections.clear()
        for task, layers in state.get("corrections", {}).items():
            self.corrections[task] = {layer: ChannelAffine(scale.clone(), shift.clone())
                                      for layer, (scale, shift) in layers.items()}
        self.heads.clear()  # in place: the evaluators hold this dict
        self.heads.update({task: {key: value.clone() for key, value in head.items()}
                           for task, head in state.get("heads", {}).items()})

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """The summary entries of a merge run: merged and expert accuracy per task and their ratio."""
        extra: dict = {"merge_method": self.cfg["merge.method"], "merge_stream": self.cfg["merge.stream"],
                       "merge_local": self.cfg["merge.local"], "merge_align": self.cfg["merge.align"],
                       "merge_tact": self.cfg["merge.tact"], "merge_task_heads": self.cfg["merge.task-heads"],
                       "merge_tasks": [task.name for task in self.tasks],
                       "expert_accuracy": dict(self.expert_accuracy)}
        if not rows:
            return extra
        merged = {task.name: float(rows[-1][f"acc/{task.name}"]) for task in self.tasks}
        normalized = {name: merged[name] / self.expert_accuracy[name] for name in merged
                      if self.expert_accuracy.get(name, 0.0) > 0}
        extra.update({"merged_accuracy": merged, "normalized_accuracy": normalized,
                      "normalized_accuracy_mean": sum(normalized.values()) / max(len(normalized), 1)})
        return extra


class CorrectedEvaluator:
    """A task's evaluator that scores the model as the task sees it: with the task's TACT corrections (when
    `corrections` has them: per-channel affines on `layers` through forward hooks) and the task's own head (when
    `heads` has it: its entries copied into the model). The model is left as it came (hooks removed, head put
    back)."""

    def __init__(self, evaluator: TaskEvaluator, layers: list[str],
                 corrections: dict[str, dict[str, ChannelAffine]],
                 heads: dict[str, StateDict] | None = None) -> None:
        self.evaluator, self.layers, self.corrections = evaluator, layers, corrections
        self.heads: dict[str, StateDict] = {} if heads is None else heads

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """The task's metrics of `model`, with the task's corrections and head where they exist."""
        name = self.evaluator.task.name
        found, head = self.corrections.get(name), self.heads.get(name)
        hooks = AffineHooks(model, self.layers) if found else None
        shared = swap_entries(model, head) if head else None
        try:
            if hooks is not None:
                hooks.set(found)
            return self.evaluator(model)
        finally:
            if hooks is not None:
                hooks.remove()
            if shared is not None:
                swap_entries(model, shared)


def swap_entries(model: torch.nn.Module, entries: StateDict) -> StateDict:
    """Copy `entries` (state-dict keys of `model`) into the model in place; returns the values they replaced."""
    state = model.state_dict()
    unknown = sorted(set(entries) - set(state))
    if unknown:
        raise KeyError(f"the model has no entries {unknown[:4]}")
    replaced = {key: state[key].detach().clone() for key in entries}
    with torch.no_grad():
        for key, value in entries.items():
            state[key].copy_(value)
    return replaced
