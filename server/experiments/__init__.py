"""Experiments as sequences of phases: the shapes the runner (`server/loop.py`) drives.

An experiment is a list of `Phase`s run one after the other on one global model. A phase is some rounds of one
Flower strategy (`server.strategies`) on one task (a data view the clients train on), with evaluators that score
the global model after every round and optional hooks for one-off exchanges at its start and end and for a
server-side step after each round.

Invariants the runner keeps:
- Rounds are numbered by the run (1, 2, ... over all phases: rounds.csv's `round`), and a phase's strategy is
  called with those numbers: train messages carry the run's round, so client state keyed by it (`client.state`)
  never goes back at a new phase, and sampling and seeds differ from phase to phase. Hooks get the round within
  the phase (1 .. phase.rounds). A one-phase run numbers its rounds 1 .. R, as `Strategy.start` does.
- The global model carries over from one phase to the next; `ctx.arrays` is that model at every hook.
- Hook order within a phase: `on_start` (before its first round), then per round configure_train -> send ->
  aggregate_train -> `after_round` -> evaluators, and after the phase's last round `on_end`, then the checkpoint.
  A hook may replace `ctx.arrays`; the runner reads it back after the hook.
- A run killed after any round and resumed continues with the next round of the same phase (`on_start` is not
  repeated); the experiment's `state_dict()` is saved after every round and given back to `load_state_dict()`.
- Every message a hook sends goes through `ctx.grid` (a `server.grid.CountingGrid`): its bytes are counted, as
  one-off traffic when its message type starts with `query.`.

The registry `EXPERIMENTS` maps the run-config key `experiment` to a factory taking the resolved config. Each entry
is a class (or a callable) with a `config_namespaces: frozenset[str]` attribute: the config namespaces it reads
(`fedsparse.config` refuses a key of another namespace set to a non-default value).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message, RecordDict

    from fedsparse.data import ChannelStats
    from server.strategies.base import FedAvg

log = logging.getLogger("fedsparse")

ClientConfigValue = bool | int | float | str


class Evaluator(Protocol):
    """Central evaluation of the global model after every round."""

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics of `model` (already holding the global weights), keyed like "acc/<task>", "loss/<task>"."""
        ...


@dataclass
class PhaseContext:
    """What a phase hook sees: the counting grid, the config, the global model and the clients.

    `model` is a torch module to load states into (its weights are not the global model's unless a hook loads
    them); `arrays` is the current global model; `nodes` maps partition id -> node id of the clients the phase's
    strategy discovered; `phase_index` is the position of `phase` in the experiment's phases."""

    grid: Any
    cfg: dict[str, Any]
    model: torch.nn.Module
    arrays: ArrayRecord
    nodes: dict[int, int]
    phase_index: int
    out_dir: Path
    phase: Phase
    timeout: float = 3600.0

    def exchange(self, messages: list[Message]) -> dict[int, RecordDict]:
        """Send one-off `messages` through the (counting) grid and wait up to `timeout`; {node id: reply content}
        of the replies that carry no error. An error reply is logged with its node id and reason; reading the
        contents (and rejecting malformed ones) is the hook's."""
        answers: dict[int, RecordDict] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node_id = int(reply.metadata.src_node_id)
            if reply.has_error():
                log.warning("node %s failed %s: %s", node_id, reply.metadata.message_type, reply.error.reason[:300])
                continue
            answers[node_id] = reply.content
        return answers


@dataclass
class Phase:
    """Some rounds of one strategy on one task.

    `task` is the data view the clients train on: the runner sends it as the train config's "task" entry when it
    differs from the run's `dataset` (the client's default), so a one-phase run on the dataset sends exactly what
    it sent before phases existed. `client_config` is merged into every train message's config record (the
    client procedure: optimiser, objective, ...). The first evaluator's first "acc/" and "loss/" metrics are the
    run's `test_accuracy` / `test_loss`."""

    name: str
    task: str
    rounds: int
    strategy: FedAvg
    evaluators: list[Evaluator]
    client_config: dict[str, ClientConfigValue] = field(default_factory=dict)
    on_start: Callable[[PhaseContext], None] | None = None
    after_round: Callable[[PhaseContext, int, ArrayRecord], ArrayRecord] | None = None
    on_end: Callable[[PhaseContext], None] | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"phase {self.name!r}: rounds must be >= 1, got {self.rounds}")
        if not self.evaluators:
            raise ValueError(f"phase {self.name!r}: at least one evaluator is needed (rounds.csv's test_accuracy)")


class Experiment(Protocol):
    """A sequence of phases with state that survives a resume.

    Optionally an experiment has a `model: torch.nn.Module` attribute (the architecture, at its initial weights):
    the runner then starts from it instead of building `cfg["model"]` for `cfg["dataset"]`; and a class attribute
    `uses_dataset = False` when its clients do not hold the run's image `dataset` (the language model's text): the
    checks before Ray then skip the dataset, partitioner and model checks and run only its `check_config`."""

    phases: list[Phase]

    def state_dict(self) -> dict:
        """What the experiment keeps between rounds (anchor model, Fisher, ...), saved in every checkpoint."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict()` returned (on resume, before the first resumed round)."""
        ...

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """After the last round: write extra files into `out_dir`; return extra summary.json entries."""
        ...


@dataclass
class TestSetEvaluator:
    """Cross-entropy loss and accuracy of a classifier on one labelled set: {"acc/<task>", "loss/<task>"}."""

    task: str
    x: np.ndarray
    y: np.ndarray
    device: torch.device | None = None
    normalize: ChannelStats | None = None  # per-channel input standardisation (the run's `normalize`)

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """The accuracy and mean loss of `model` on the set (the same numbers as `fedsparse.train.evaluate`)."""
        from fedsparse.train import evaluate

        loss, accuracy = evaluate(model, self.x, self.y, device=self.device, normalize=self.normalize)
        return {f"acc/{self.task}": accuracy, f"loss/{self.task}": loss}


def _registry() -> dict[str, Callable[[dict], Experiment]]:
    """The experiments, imported here because their modules import the classes above."""
    from server.experiments.connectivity import ConnectivityExperiment
    from server.experiments.continual import ContinualExperiment
    from server.experiments.language import LanguageExperiment
    from server.experiments.language_facts import LMFactsExperiment
    from server.experiments.language_unlearning import LMUnlearnExperiment
    from server.experiments.merging import MergeExperiment
    from server.experiments.standard import StandardExperiment
    from server.experiments.transfer import TransferExperiment
    from server.experiments.unlearning import UnlearnExperiment

    return {"standard": StandardExperiment, "continual": ContinualExperiment, "unlearn": UnlearnExperiment,
            "merge": MergeExperiment, "transfer": TransferExperiment,
            "connectivity": ConnectivityExperiment, "lm": LanguageExperiment,
            "lm-unlearn": LMUnlearnExperiment, "lm-mechanistic": LMFactsExperiment}


EXPERIMENTS: dict[str, Callable[[dict], Experiment]] = _registry()
"""Experiment name (run-config key `experiment`) -> factory taking the resolved config."""
