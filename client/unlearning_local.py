"""The client side of the unlearn experiment's registry methods: one `fedsparse.unlearning` method run locally.

Handler (registered in `client.handlers.HANDLERS`; `client.client_app` imports this module):
- `train.unlearn_local` (`LOCAL_TRAIN_MESSAGE`, sent by `server.experiments.unlearning_local.LocalUnlearnFedAvg`):
  the client splits its own training data into its retain and forget parts (`own_parts`, the experiment's
  forget set), runs the method the message names (`unlearn-method`) on (retain part, forget part) with the round's
  budget (`local-epochs` passes, batch size, momentum, weight decay and clipping of the run; learning rate
  `unlearn.local-lr`, or the round's when 0), and replies the update to the received model, as a train round does:
  the server averages them (FedAvg).

What a client runs (`local_method`): a client that holds forget data runs the method itself; one that holds none
runs the method's retain-only counterpart:
- gradient_ascent, neggrad_plus, random_label, salun: `finetune` on its retain part (without forget data the method
  has nothing to ascend on, relabel or take a saliency mask from).
- l1_sparse: `l1_sparse` (the method never reads the forget set).
- scrub: `scrub` with its min pass only (retain cross-entropy + distillation towards the teacher).

State that spans the phase (the methods' whole-run schedules, mapped onto rounds; `phase-round` r of `phase-rounds`
R and local-epochs E come in the message and the run config):
- SCRUB's teacher is the global model at the start of the unlearning phase (the trained model), sent with every
  scrub round as the `teacher` record (the strategy keeps it); its "max" passes run in the phase's first
  `unlearn.scrub-max-epochs` epochs: round r runs max(0, K - (r - 1) * E) of them.
- L1-sparse's penalty decays linearly over the phase: round r runs the library's `l1_sparse` with coefficient
  `unlearn.l1-coefficient` * (1 - (r - 1) / R) (which it decays within the round over the E local epochs; with
  E = 1 this is the centralized schedule over R epochs exactly).
- SalUn's saliency mask and random-label's labels are drawn afresh every round, on the received model, from the
  client's own forget part.

Invariants: every gradient a client takes is on its own training data (its retain and forget parts, nothing
else; tested); the update is the unlearned model minus the received one, so FedAvg on the server averages the
clients' unlearned models; the reply's `num-examples` is the client's training set size (retain + forget parts);
its `train-loss` is the unlearned model's cross-entropy on the retain part and `forget-loss` (when the client holds
forget data) on the forget part.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from flwr.app import MetricRecord, RecordDict
from torch import nn

from client.handlers import LocalUpdate, handler, local_data, receive_model, train_reply
from client.unlearning import client_parts
from fedsparse import sparse
from fedsparse.config import UNLEARN_LOCAL_METHODS
from fedsparse.train import evaluate, pick_device
from fedsparse.unlearning import ArrayData, UnlearnConfig, unlearn
from fedsparse.unlearning.methods.scrub import scrub_from_teacher

LOCAL_TRAIN_MESSAGE = "train.unlearn_local"
TEACHER_RECORD = "teacher"

LOCAL_METHODS = UNLEARN_LOCAL_METHODS
"""The registry methods the unlearn experiment runs as local procedures (`unlearn.method` choices beyond the
experiment's own federated methods retrain / finetune / del / federaser)."""

WITHOUT_FORGET_DATA = {"gradient_ascent": "finetune", "neggrad_plus": "finetune", "l1_sparse": "l1_sparse",
                       "random_label": "finetune", "salun": "finetune", "scrub": "scrub"}
"""What a client that holds no forget data runs instead of each method (module docstring)."""


class LocalUnlearnError(ValueError):
    """A `train.unlearn_local` message this client cannot run; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class ClientParts:
    """A client's training data split by the experiment's forget set: what it keeps and what it forgets."""

    retain: ArrayData
    forget: ArrayData


@dataclass(frozen=True)
class PhaseStep:
    """Where a round sits in the unlearning phase: round `phase_round` (1-based) of `phase_rounds`."""

    phase_round: int
    phase_rounds: int

    def __post_init__(self) -> None:
        if not 1 <= self.phase_round <= self.phase_rounds:
            raise ValueError(f"phase round must be in [1, {self.phase_rounds}], got {self.phase_round}")


def own_parts(cfg: dict, partition_id: int) -> ClientParts:
    """This client's training data split into its retain and forget parts by the experiment's forget set
    (`client.unlearning.forget_split`, the split the server evaluates with)."""
    x, y = local_data(cfg, partition_id)
    retain, forget = client_parts(cfg, partition_id, x, y)
    return ClientParts(retain=retain, forget=forget)


def local_method(method: str, holds_forget_data: bool) -> str:
    """The registry method a client runs for `method`: the method itself, or without forget data its retain-only
    counterpart (`WITHOUT_FORGET_DATA`)."""
    if method not in LOCAL_METHODS:
        raise ValueError(f"'{method}' is not a local unlearning method; known: {', '.join(LOCAL_METHODS)}")
    return method if holds_forget_data else WITHOUT_FORGET_DATA[method]


def phase_settings(cfg: dict, lr: float, step: PhaseStep, seed: int, device: str) -> UnlearnConfig:
    """The `UnlearnConfig` of one round: the run's local budget and the method knobs, with the whole-phase
    schedules of L1-sparse and SCRUB mapped onto round `step` (module docstring)."""
    epochs = cfg["local-epochs"]
    return UnlearnConfig(
        epochs=epochs, batch_size=cfg["batch-size"], lr=cfg["unlearn.local-lr"] or lr, momentum=cfg["momentum"],
        weight_decay=cfg["weight-decay"], grad_clip=cfg["grad-clip"], seed=seed, device=device,
        neggrad_beta=cfg["unlearn.neggrad-beta"], salun_fraction=cfg["unlearn.salun-fraction"],
        l1_coefficient=cfg["unlearn.l1-coefficient"] * (1 - (step.phase_round - 1) / step.phase_rounds),
        scrub_max_epochs=max(0, cfg["unlearn.scrub-max-epochs"] - (step.phase_round - 1) * epochs))


def run_local_method(method: str, model: nn.Module, parts: ClientParts, settings: UnlearnConfig,
                     teacher: nn.Module | None = None) -> nn.Module:
    """The unlearned model a client with `parts` produces for `method` (`local_method` picks what runs; scrub
    needs the phase's `teacher`). `model` is left unchanged."""
    runs = local_method(method, len(parts.forget) > 0)
    if runs == "scrub":
        if teacher is None:
            raise LocalUnlearnError("scrub needs the phase's teacher model (the message has no teacher record)")
        return scrub_from_teacher(model, teacher, parts.retain, parts.forget, settings)
    return unlearn(runs, model, parts.retain, parts.forget, settings)


def local_seed(cfg: dict, server_round: int, partition_id: int) -> int:
    """The seed of one client's local procedure in one round (data order, random labels)."""
    return (cfg["seed"] * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


@handler(LOCAL_TRAIN_MESSAGE)
def unlearn_local(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """A round of a registry method: run it on this client's retain / forget parts, reply the update."""
    config = content["config"]
    method = str(config["unlearn-method"])
    if method not in LOCAL_METHODS:
        raise LocalUnlearnError(f"the message asks for '{method}', not a local unlearning method "
                                f"({', '.join(LOCAL_METHODS)})")
    received = receive_model(content, state, cfg)
    net, layout, masks = received.net, received.layout, received.masks
    if masks is not None:
        raise LocalUnlearnError("the registry methods run on the dense model; this message names a sparsity mask")
    start = sparse.gather({k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, layout, masks)
    teacher = None
    if TEACHER_RECORD in content:
        teacher = copy.deepcopy(net)
        teacher.load_state_dict(content[TEACHER_RECORD].to_torch_state_dict())
    server_round = int(config["server-round"])
    device = pick_device(cfg["device"])
    step = PhaseStep(int(config["phase-round"]), int(config["phase-rounds"]))
    settings = phase_settings(cfg, float(config["lr"]), step, local_seed(cfg, server_round, partition_id),
                              str(device))
    parts = own_parts(cfg, partition_id)
    unlearned = run_local_method(method, net, parts, settings, teacher).cpu()
    end = sparse.gather({k: v.detach().cpu().clone() for k, v in unlearned.state_dict().items()}, layout, masks)
    metrics = {"num-examples": len(parts.retain) + len(parts.forget), "partition-id": partition_id,
               "train-loss": evaluate(unlearned, parts.retain.x, parts.retain.y, device=device)[0]}
    if len(parts.forget):
        metrics["forget-loss"] = evaluate(unlearned, parts.forget.x, parts.forget.y, device=device)[0]
    update = LocalUpdate(end[0] - start[0], end[1] - start[1], received.fingerprint, MetricRecord(metrics))
    return train_reply(update, content)


__all__ = ["LOCAL_METHODS", "LOCAL_TRAIN_MESSAGE", "TEACHER_RECORD", "ClientParts", "LocalUnlearnError", "PhaseStep",
           "local_method", "own_parts", "phase_settings", "run_local_method", "scrub_from_teacher",
           "unlearn_local"]
