"""LM unlearning as federated rounds: a client of the federated char GPT asks that its forget set be forgotten.

`LMUnlearnExperiment(cfg)` (registered as EXPERIMENTS["lm-unlearn"]) has two phases, both of `train.lmu` rounds
(`client.language_unlearning`; the lm experiment's model, corpus, speaker partition and local steps):
1. `train`: `lmu.train-rounds` FedAvg rounds on every client's text; client `lmu.client`'s text holds the forget
   set (ID passages of its own text, or OOD canaries inserted `lmu.repeats` times).
2. `unlearn:<method>`: `lmu.rounds` rounds, started by `lmu.method` (`LMUnlearnExperiment.method_starts`):
   - `retrain` (the oracle): from the run's initial model, every client on its retain text (the forget set never
     reaches a gradient);
   - `finetune`: FedAvg goes on from the trained model on the retain text;
   - `gradient_ascent`: from the trained model, the forgetting client ascends on its forget set
     (`lmu.ascent-steps` Adam steps at `lmu.ascent-lr` per round) while the others descend on their text; FedAvg
     averages the two kinds of update with the usual text-size weights, so the ascent is diluted by the others.
   `lmu.participants` picks who takes part: `all`, `others` (without the forgetting client: retrain / finetune on
   the other clients only) or `client` (gradient_ascent by the forgetting client alone).

Evaluators after every round: validation loss / perplexity / accuracy (`ValidationEvaluator`, first: `acc/val` is
the run's test_accuracy) and `ForgetEvaluator`: mean loss of the forget examples and of their never-trained twins,
`fedsparse.lm.memorization.forget_quality` (quality, epsilon, AUC of forget vs twins) and the share of forget
examples extracted exactly (greedy continuation of the first `lmu.prefix` characters). `finish` writes
`lmu_trace.csv` (the unlearning phase round by round, round 0 = the trained model) and `lmu_trace.png` (quality,
extraction and validation perplexity per round) and reports before/after figures and the phase's rounds and bytes.

Invariants: nothing here keeps state (the runner's checkpoint is a complete resume point; the trained model's
figures are read back from the last training row); the forget set and its twins are a function of the config, the
same on the server and every client.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from client.language import build_lm, lm_corpus
from client.language_unlearning import TRAIN_MESSAGE, LMForgetSet, lm_forget_set
from fedsparse.config import ConfigError
from fedsparse.lm.memorization import exact_extraction, forget_quality, sequence_losses
from fedsparse.lm.model import GPT
from fedsparse.lm.tokenizer import CharTokenizer
from server.experiments import Phase, PhaseContext
from server.experiments.language import LanguageExperiment, LanguageFedAvg, ValidationEvaluator
from server.strategies.base import FedAvg

METHODS = ("retrain", "finetune", "gradient_ascent")
TRACE_COLUMNS = ("round", "ppl/val", "loss/val", "loss/forget", "loss/twins", "quality/forget", "eps/forget",
                 "auc/forget", "extract/forget", "bytes")


class LMUnlearnFedAvg(LanguageFedAvg):
    """FedAvg of `train.lmu` rounds, sending to every sampled partition except those in `excluded`."""

    message_type = TRAIN_MESSAGE

    def __init__(self, *, excluded: frozenset[int] = frozenset(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.excluded = excluded

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """FedAvg's train messages, less those to an excluded partition."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        excluded_nodes = {node for partition, node in self.roster.partitions().items() if partition in self.excluded}
        kept = [message for message in messages if message.metadata.dst_node_id not in excluded_nodes]
        self.plans[server_round] = dataclasses.replace(self.plans[server_round], messages=kept)
        return kept


@dataclasses.dataclass
class ForgetEvaluator:
    """Forget-set measures of the global LM: {"loss/forget", "loss/twins", "quality/forget", "eps/forget",
    "auc/forget", "extract/forget"} (module docstring)."""

    forget: LMForgetSet
    tokenizer: CharTokenizer
    prefix: int

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """The measures of `model` (holding the global weights) on the forget set and its twins."""
        forget_losses = sequence_losses(model, self.tokenizer, self.forget.forget.examples)
        twin_losses = sequence_losses(model, self.tokenizer, self.forget.forget.holdout)
        quality = forget_quality(forget_losses, twin_losses)
        extracted = exact_extraction(model, self.tokenizer, self.forget.forget.examples, self.prefix)
        return {"loss/forget": float(forget_losses.mean()), "loss/twins": float(twin_losses.mean()),
                "quality/forget": quality.quality, "eps/forget": min(quality.epsilon, 1e9), "auc/forget": quality.auc,
                "extract/forget": float(extracted.mean())}


class LMUnlearnExperiment:
    """Train the federated char GPT with a forget set at one client, then forget it (module docstring)."""

    config_namespaces: frozenset[str] = frozenset({"lm", "lmu"})
    uses_dataset = False

    def __init__(self, cfg: dict) -> None:
        self.check_config(cfg)
        self.cfg = cfg
        corpus = lm_corpus(cfg)
        self.model: GPT = build_lm(cfg, seed=cfg["seed"])
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.forget = lm_forget_set(cfg)
        self.val_stream = corpus.tokenizer.encode_tensor(corpus.val)
        evaluators = [ValidationEvaluator(self.val_stream, cfg["lm.eval-windows"]),
                      ForgetEvaluator(self.forget, corpus.tokenizer, cfg["lmu.prefix"])]
        arguments = FedAvg.config_arguments(cfg)
        train = LMUnlearnFedAvg(maskable=[], **arguments)
        unlearn = LMUnlearnFedAvg(maskable=[], excluded=self.excluded(cfg), **arguments)
        for strategy in (train, unlearn):
            strategy.max_examples = len(corpus.train) + len(self.forget.full_text)
        mode = "ascend" if self.method == "gradient_ascent" else "retain"
        self.phases: list[Phase] = [
            Phase(name="train", task=cfg["dataset"], rounds=cfg["lmu.train-rounds"], strategy=train,
                  evaluators=evaluators, client_config={"lmu-mode": "full"}),
            Phase(name=f"unlearn:{self.method}", task=cfg["dataset"], rounds=cfg["lmu.rounds"], strategy=unlearn,
                  evaluators=evaluators, client_config={"lmu-mode": mode}, on_start=self.on_start),
        ]

    @property
    def method(self) -> str:
        """The unlearning method (`lmu.method`)."""
        return self.cfg["lmu.method"]

    @staticmethod
    def excluded(cfg: dict) -> frozenset[int]:
        """The partitions left out of the unlearning phase by `lmu.participants`."""
        client = cfg["lmu.client"]
        if cfg["lmu.participants"] == "others":
            return frozenset({client})
        if cfg["lmu.participants"] == "client":
            return frozenset(range(cfg["num-clients"])) - {client}
        return frozenset()

    @staticmethod
    def check_config(cfg: dict) -> None:
        """ConfigError naming the key when the settings cannot host the experiment: the lm experiment's checks, a
        forgetting client that does not exist, forget examples longer than the context or shorter than the
        extraction prefix, a participants choice the method cannot use, a client text without enough passages."""
        LanguageExperiment.check_config(cfg)
        if cfg["lmu.client"] >= cfg["num-clients"]:
            raise ConfigError(f"config key 'lmu.client': {cfg['lmu.client']} is not a partition of "
                              f"num-clients={cfg['num-clients']}")
        if cfg["lmu.length"] > cfg["lm.block-size"] + 1:
            raise ConfigError(f"config key 'lmu.length': {cfg['lmu.length']} exceeds lm.block-size + 1 = "
                              f"{cfg['lm.block-size'] + 1}")
        if cfg["lmu.prefix"] >= cfg["lmu.length"]:
            raise ConfigError(f"config key 'lmu.prefix': must be less than lmu.length={cfg['lmu.length']}, got "
                              f"{cfg['lmu.prefix']}")
        method, participants = cfg["lmu.method"], cfg["lmu.participants"]
        if method == "gradient_ascent" and participants == "others":
            raise ConfigError("config key 'lmu.participants': gradient_ascent needs the forgetting client "
                              "(all or client), got 'others'")
        if method != "gradient_ascent" and participants == "client":
            raise ConfigError(f"config key 'lmu.participants': 'client' (the forgetting client alone) is for "
                              f"gradient_ascent, not {method}")
        if participants == "others" and cfg["num-clients"] < 2:
            raise ConfigError("config key 'lmu.participants': 'others' needs num-clients >= 2")
        try:
            lm_forget_set(cfg)
        except ValueError as err:  # corpus_passages: too few turns of lmu.length characters
            raise ConfigError(f"config key 'lmu.count': {err}") from err

    def method_starts(self) -> dict[str, Callable[[PhaseContext], ArrayRecord]]:
        """`lmu.method` -> the global model the unlearning phase starts from."""
        return {"retrain": lambda ctx: ArrayRecord({k: v.clone() for k, v in self.initial.items()}),
                "finetune": lambda ctx: ctx.arrays, "gradient_ascent": lambda ctx: ctx.arrays}

    def on_start(self, ctx: PhaseContext) -> None:
        """The request arrives: the unlearning phase starts from the model its method names."""
        ctx.arrays = self.method_starts()[self.method](ctx)

    def state_dict(self) -> dict:
        """Nothing to keep: the global model and the strategies are checkpointed by the runner."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """The trace (csv, png) of the unlearning phase and the summary: forget set, method, before / after
        figures, rounds and bytes of the phase."""
        out_dir = Path(out_dir)
        trained_rows = [r for r in rows if r.get("phase") == "train"]
        phase_rows = [r for r in rows if r.get("phase") == self.phases[1].name]
        trace = trace_rows(trained_rows[-1:], phase_rows)
        write_trace(out_dir / "lmu_trace.csv", trace)
        if trace:
            plot_trace(out_dir / "lmu_trace.png", {self.method: trace}, title=self.forget.forget.name)
        forget = self.forget.forget
        extra: dict = {"lmu_method": self.method, "lmu_forget": self.cfg["lmu.forget"], "lmu_set": forget.name,
                       "lmu_client": self.forget.client, "lmu_participants": self.cfg["lmu.participants"],
                       "forget_examples": len(forget.examples), "forget_chars_in_training": len(self.forget.full_text)
                       - len(self.forget.retain_text), "parameters": self.model.num_parameters()}
        if trace:
            extra["before"] = {k: trace[0][k] for k in TRACE_COLUMNS if k not in ("round", "bytes")}
            extra["after"] = {k: trace[-1][k] for k in TRACE_COLUMNS if k not in ("round", "bytes")}
        extra["unlearn_rounds"] = len(phase_rows)
        extra["unlearn_bytes"] = sum(int(r["bytes_down"]) + int(r["bytes_up"]) for r in phase_rows)
        return extra


def trace_rows(trained: list[dict], phase: list[dict]) -> list[dict]:
    """The unlearning phase round by round (round 0: the last training row, if given), with cumulative bytes."""
    trace, spent = [], 0
    for index, row in enumerate(trained + phase):
        if index > 0 or not trained:
            spent += int(row["bytes_down"]) + int(row["bytes_up"])
        entry = {k: float(row[k]) for k in TRACE_COLUMNS if k not in ("round", "bytes")}
        trace.append({"round": index if trained else index + 1, **entry, "bytes": spent})
    return trace


def write_trace(path: Path, trace: list[dict]) -> None:
    """`trace` as a CSV with columns `TRACE_COLUMNS`."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(TRACE_COLUMNS))
        writer.writeheader()
        writer.writerows(trace)


def plot_trace(path: Path, traces: dict[str, list[dict]], title: str) -> None:
    """Forget quality, extraction and validation perplexity per round of the unlearning phase, one line per
    label of `traces`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, trace in traces.items():
        rounds = [t["round"] for t in trace]
        axes[0].plot(rounds, [t["quality/forget"] for t in trace], marker="o", label=label)
        axes[1].plot(rounds, [t["extract/forget"] for t in trace], marker="o", label=label)
        axes[2].plot(rounds, [t["ppl/val"] if math.isfinite(t["ppl/val"]) else float("nan") for t in trace],
                     marker="o", label=label)
    for axis, name in zip(axes, ("forget quality (1 = like never-trained twins)", "exact extraction rate",
                                 "validation perplexity"), strict=True):
        axis.set_xlabel("unlearning round (0 = trained)")
        axis.set_title(name, fontsize=9)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
