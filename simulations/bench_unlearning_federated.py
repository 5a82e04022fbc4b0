"""Federated unlearning benchmark: client withdrawal as federated rounds (the `unlearn` experiment), several seeds,
and the NeurIPS 2023 competition's forgetting score for federated runs.

Every run is the unlearn experiment (`server.experiments.unlearning`) driven by the real runner
(`server.loop.run_federation`) with the real client handlers in this process (`InProcessGrid`: one Context.state per
node, as the Flower simulation gives, without Ray's start-up). Settings are the `unlearn-federated` preset's
(Fashion-MNIST, cnn, 10 clients, Dirichlet 0.3, 10 FedAvg rounds on all, client 0 withdraws, 5 rounds of unlearning
on the nine others) with `--train-subset` training images; `--set key=value` overrides any run-config key, and
`--methods` / `--forget` take any `unlearn.method` / `unlearn.forget` values the experiment knows.

Every run is two calls of the runner, joined by its checkpoint:
1. Phase 1 (`train`, the rounds before the withdrawal; `run_phase_one`) runs until the runner has written the
   checkpoint of its last round; the grid stops the run at the first message of phase 2 (`PhaseOneDone`).
2. Phase 2 (`unlearn:<method>`; `run_phase_two`) is the runner's own resume of a copy of that folder
   (`resume=true`): the runner checks the copy's config against the run's, restores the model, rows and experiment
   state, and starts phase 2 (its `on_start` included). A resumed run ends with the same model as an uninterrupted
   one (the runner's resume invariant; `tests/test_bench_unlearning_federated.py` checks it bit for bit here).
One phase 1 serves every method of a seed: for `retrain`, `finetune` and `del` (`SHARED_PHASE_ONE_METHODS`) phase 1 is
the same FedAvg on every client and reads no `unlearn.method` / `unlearn.rounds`, so the copy gets the method's
config written into it (`relabel_phase_one`) and the runner's resume checks every other key (the test checks that
phase 1 under two methods gives bit-identical checkpoints). Any other method runs its own phase 1.
Phase 2's seconds are the resumed call's wall time (data loading and per-round evaluation included, the same
for every method).

Parts (`--parts`, default both):
- `withdrawal`: every method x `--seeds`: mean +- sd of forget / retain / test accuracy, loss-threshold MIA AUC
  (forget vs test), % of parameters changed against the trained model, rounds, round bytes (the unlearning
  rounds) and one-off bytes (the method's `query.*` exchanges), seconds. `retrain` is the oracle: phase 2 starts
  again from the run's initial model, with `--oracle-rounds` rounds (default: as many as phase 1, a full-budget
  retraining); the other methods get `--rounds`.
- `score`: the competition's forgetting score (`fedsparse.unlearning.evaluate.forgetting_score`) for federated
  runs at seed `--score-seed`: for each method, phase 1 once, then `--models` N phase-2 runs that share that
  trained model and differ only in the clients' randomness in phase 2 (run j: round offset j x `ROUND_OFFSET`;
  run 0 is the plain run); the retrained side is N `retrain` runs made the same way. Per forget example, the attacks on
  the N unlearned vs N retrained logit-scaled confidences give eps; F = mean 2^-floor(2 eps); score = F x retain
  ratio x test ratio. N bounds the eps it resolves (`epsilon_resolution`): N = 8 resolves eps up to 1.95, its
  levels are 1, 1/2, 1/4, 1/8 and 0.
  What varies between the N runs, and what does not: the run's seed also draws the clients' partitions (so the
  forget set), the initial model (retrain's start) and DEL's fresh initialisation, so it must stay fixed; the N
  runs vary only the clients' own randomness in phase 2 (their data order, and whatever else a client draws per
  round), through the grid: the clients key every per-round draw on the message's `server-round`, so run j hands
  each phase-2 train message (`train.*`) to its client with `server-round` + j x `ROUND_OFFSET` and puts the true
  round back into the reply's echo (`InProcessGrid.round_offset`); the clients' data, the server and the
  messages on the wire are unchanged. The N retrained models thus share their initial model: the oracle's spread
  is that of the clients' randomness alone.

Writes under `--out` (default results/bench_unlearning_federated/): `withdrawal.csv` (one row per run),
`withdrawal.md`, `withdrawal.png`; `score.csv` (one row per method), `score_runs.csv` (one row per phase-2 run),
`score.md`, `score.png` (per-example eps histograms). Each file is rewritten as soon as its part has its rows.

Measured (README "Unlearning as federated rounds", CPU, 2 cores at load ~25): Fashion-MNIST withdrawal at
`--train-subset 3000 --oracle-rounds 5`, seeds 0-2, forget / test accuracy %: 5-round retrain 7.9 / 41.4, finetune
65.7 / 69.7, del 18.0 / 46.2 (30.2% of the parameters changed; 45.9 round MB + 12.8 MB once vs 151.8 MB). The score
on digits (mlp, 5 local epochs), N = 8, seed 0: del 0.042, finetune 0.069. Later, at load ~10 with
`--set eval-every=100` (central evaluation only at each phase's end; same models): the score on Fashion-MNIST
(`--train-subset 3000`, N = 8, seed 0, 170 rounds in 41 minutes): del 0.017, finetune 0.092; the sample-level
digits table (`--forget client-samples`) over seeds 0 1 2, and `--forget uniform` with del (every client holding
forget examples sends its channel scores; `server.experiments.unlearning`).

    .venv/bin/python simulations/bench_unlearning_federated.py --parts withdrawal --train-subset 3000 --seeds 0 1 2
    .venv/bin/python simulations/bench_unlearning_federated.py --parts score --models 8 --train-subset 0 \
        --set dataset=digits model=mlp local-epochs=5
    .venv/bin/python simulations/bench_unlearning_federated.py --parts score --models 8 --train-subset 3000 \
        --methods retrain del finetune --set eval-every=100
    .venv/bin/python simulations/bench_unlearning_federated.py --collect OUT_SEED0 OUT_SEED1 --out OUT  # merge
    .venv/bin/python simulations/bench_unlearning_federated.py --seeds 0 --methods del --phase-one PHASE1_DIR
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "simulations" / "presets" / "unlearn-federated.toml"
PHASE_ONE_TYPES = frozenset({"query.info", "train"})  # what phase 1 (FedAvg on every client) sends
PHASE_TWO_TRAIN = "train."  # the message types of phase-2 rounds (train.unlearn, train.unlearn_local, ...)
SHARED_PHASE_ONE_METHODS = frozenset({"retrain", "finetune", "del"})  # their phase 1 is the same plain FedAvg
ROUND_OFFSET = 1_000_000  # run j's clients see phase-2 rounds shifted by j x this (module docstring)
DEFAULT_METHODS = ("retrain", "finetune", "del")


class PhaseOneDone(Exception):
    """Raised by the grid at the first message of phase 2 when the run is to stop after phase 1."""


class RoundLimitReached(Exception):
    """Raised by the grid at the first train message of a round past its `stop_after_round`."""


def shifted_content(content: RecordDict, server_round: int) -> RecordDict:
    """A copy of a train message's content whose config says `server_round` (the records themselves are shared)."""
    records = dict(content.items())
    records["config"] = ConfigRecord({**dict(content["config"].items()), "server-round": server_round})
    return RecordDict(records)


class InProcessGrid:
    """A Flower Grid whose nodes are the client handlers in this process (node id 1000 + partition), one
    Context.state per node; a handler's exception becomes an error reply, as in Flower.

    `stop_at_phase_two`: raise `PhaseOneDone` at the first message whose type phase 1 never sends.
    `round_offset`: added to the `server-round` of every phase-2 train message (type `train.*`) before its client
    sees it, and taken off the reply's echo (module docstring: the N runs of the score part).
    `stop_after_round`: raise `RoundLimitReached` at the first train message of a later round (the checkpoint of
    that round is then the run's last)."""

    def __init__(self, cfg: dict, *, stop_at_phase_two: bool = False, round_offset: int = 0,
                 stop_after_round: int | None = None) -> None:
        import client.client_app  # noqa: F401  (registers every handler)
        from client.handlers import HANDLERS

        self.handlers = HANDLERS
        self.cfg = cfg
        self.stop_at_phase_two = stop_at_phase_two
        self.round_offset = round_offset
        self.stop_after_round = stop_after_round
        self.partitions = {1000 + p: p for p in range(cfg["num-clients"])}
        self.states = {node: RecordDict() for node in self.partitions}

    def get_node_ids(self) -> Iterable[int]:
        """Every node, always connected."""
        return list(self.partitions)

    def handle(self, message: Message) -> RecordDict:
        """The reply content of the node the message is for."""
        node, kind = message.metadata.dst_node_id, message.metadata.message_type
        partition = self.partitions[node]
        if not (self.round_offset and kind.startswith(PHASE_TWO_TRAIN)):
            return self.handlers[kind](message.content, self.states[node], self.cfg, partition)
        server_round = int(message.content["config"]["server-round"])
        content = shifted_content(message.content, server_round + self.round_offset)
        reply = self.handlers[kind](content, self.states[node], self.cfg, partition)
        if "config" in reply and "server-round" in reply["config"]:
            reply["config"]["server-round"] = server_round
        return reply

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        """Each message handled by its node, in order."""
        messages = list(messages)
        if self.stop_at_phase_two and any(m.metadata.message_type not in PHASE_ONE_TYPES for m in messages):
            raise PhaseOneDone
        if self.stop_after_round is not None and any(
                m.metadata.message_type.startswith("train") and
                int(m.content["config"]["server-round"]) > self.stop_after_round for m in messages):
            raise RoundLimitReached
        replies = []
        for message in messages:
            try:
                replies.append(Message(self.handle(message), reply_to=message))
            except Exception as err:  # noqa: BLE001  (as Flower: any client exception is an error reply)
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message))
        return replies


def preset_config() -> dict:
    """The `unlearn-federated` preset as a flat dict of run-config keys."""
    from fedsparse.config import flatten

    return flatten(tomllib.loads(PRESET.read_text()))


def method_config(base: dict, method: str, seed: int, rounds: int, oracle_rounds: int) -> dict:
    """The run config of one method at one seed: `retrain` gets `oracle_rounds` unlearning rounds, others `rounds`."""
    unlearn_rounds = oracle_rounds if method == "retrain" else rounds
    train_rounds = int(base["unlearn.train-rounds"])
    return {**base, "seed": seed, "unlearn.method": method, "unlearn.rounds": unlearn_rounds,
            "num-rounds": train_rounds + unlearn_rounds}


def run_phase_one(overrides: dict, folder: Path) -> Path:
    """Phase 1 of the run in `folder` (stopped before phase 2); returns `folder`, holding its checkpoint."""
    from fedsparse.config import resolve
    from server.loop import run_federation

    cfg = resolve({**overrides, "output-dir": str(folder)})
    try:
        run_federation(InProcessGrid(cfg, stop_at_phase_two=True), cfg)
    except PhaseOneDone:
        return folder
    raise RuntimeError(f"{folder}: the run ended without a phase 2 (check unlearn.rounds)")


@dataclasses.dataclass(frozen=True)
class PhaseTwo:
    """One phase-2 run: its summary.json, folder and wall seconds."""

    summary: dict
    folder: Path
    seconds: float


def relabel_phase_one(phase_one: Path, overrides: dict, folder: Path) -> Path:
    """A copy of a phase-1 folder in `folder` with the config of `overrides` written into its checkpoint and
    config.json, for a method whose phase 1 is the same (`SHARED_PHASE_ONE_METHODS`); returns `folder`."""
    from fedsparse import results
    from fedsparse.config import resolve
    from server.loop import CHECKPOINT

    if overrides["unlearn.method"] not in SHARED_PHASE_ONE_METHODS:
        raise ValueError(f"phase 1 of {overrides['unlearn.method']!r} may differ from the shared one: run its own")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**resolve({**overrides, "output-dir": str(folder)}), "resume": False}
    checkpoint = torch.load(phase_one / CHECKPOINT, weights_only=False)
    checkpoint["config"] = cfg
    torch.save(checkpoint, folder / CHECKPOINT)
    results.write_json(folder / "config.json", cfg)
    return folder


def phase_one_for(overrides: dict, shared: Path | None, folder: Path) -> Path:
    """The phase-1 folder of a run: a relabelled copy of `shared` when the method's phase 1 is the shared one
    (`SHARED_PHASE_ONE_METHODS`), else its own phase 1 run in `folder`."""
    if shared is not None and overrides["unlearn.method"] in SHARED_PHASE_ONE_METHODS:
        return relabel_phase_one(shared, overrides, folder)
    return run_phase_one(overrides, folder)


def truncated_oracle(snapshot: Path, overrides: dict, folder: Path) -> PhaseTwo:
    """The `retrain` run of `overrides` (k oracle rounds) finished from `snapshot`, the folder of a longer oracle
    run of the same seed stopped after its k-th oracle round. The first k rounds of an oracle phase are a k-round
    oracle phase: same round numbers, so the same learning rate (it depends on the round only), client seeds and
    messages; the copy gets the k-round config (`relabel_phase_one`) and the runner, finding every round done,
    only writes the final model and scores it (tested against a k-round run)."""
    from server.loop import CHECKPOINT

    rows = torch.load(snapshot / CHECKPOINT, weights_only=False)["rows"]
    if len(rows) != overrides["num-rounds"]:
        raise ValueError(f"{snapshot} holds {len(rows)} rounds, the {overrides['unlearn.rounds']}-round oracle has "
                         f"{overrides['num-rounds']}")
    relabelled = relabel_phase_one(snapshot, overrides, folder / "relabelled")
    return run_phase_two(overrides, relabelled, folder / "phase2")


def run_phase_two(overrides: dict, phase_one: Path, folder: Path, round_offset: int = 0) -> PhaseTwo:
    """Phase 2 of the run: resume a copy of the phase-1 folder into `folder` (`round_offset`: `InProcessGrid`)."""
    from fedsparse.config import resolve
    from server.loop import CHECKPOINT, run_federation

    folder.mkdir(parents=True, exist_ok=True)
    for name in (CHECKPOINT, "config.json"):
        shutil.copyfile(phase_one / name, folder / name)
    cfg = resolve({**overrides, "output-dir": str(folder), "resume": True})
    start = time.perf_counter()
    summary = run_federation(InProcessGrid(cfg, round_offset=round_offset), cfg)
    return PhaseTwo(summary, folder, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- withdrawal


WITHDRAWAL_METRICS = ("forget_accuracy", "retain_accuracy", "test_accuracy_after", "mia_auc", "fraction_changed")


def withdrawal_row(method: str, seed: int, run: PhaseTwo) -> dict:
    """One CSV row of the withdrawal table from a phase-2 run's summary."""
    summary = run.summary
    before = summary["before"]
    return {"method": method, "seed": seed, **{name: summary[name] for name in WITHDRAWAL_METRICS},
            "rounds": summary["unlearn_rounds"], "round_bytes": summary["unlearn_round_bytes"],
            "oneoff_bytes": summary["unlearn_oneoff_bytes"], "seconds": round(run.seconds, 1),
            "before_forget_accuracy": before["forget_accuracy"], "before_retain_accuracy": before["retain_accuracy"],
            "before_test_accuracy": before["test_accuracy"], "before_mia_auc": before["mia_auc"]}


def mean_sd(values: Iterable[float], scale: float = 1.0, digits: int = 1) -> str:
    """'mean +- sd' of `values` x `scale` (sd over runs, ddof 1; '-' for one run)."""
    scaled = scale * np.asarray(list(values), dtype=float)
    spread = f"{scaled.std(ddof=1):.{digits}f}" if len(scaled) > 1 else "-"
    return f"{scaled.mean():.{digits}f} +- {spread}"


def withdrawal_table(rows: list[dict], methods: list[str]) -> str:
    """The markdown table: the trained model (before), then every method; mean +- sd over its seeds."""
    header = ("| method | forget acc % | retain acc % | test acc % | MIA AUC | params changed % | rounds | round MB "
              "| one-off KB | seconds |")
    lines = [header, "|---" * 10 + "|"]
    first = [r for r in rows if r["method"] == rows[0]["method"]]
    lines.append(f"| trained (before) | {mean_sd((r['before_forget_accuracy'] for r in first), 100)} | "
                 f"{mean_sd((r['before_retain_accuracy'] for r in first), 100)} | "
                 f"{mean_sd((r['before_test_accuracy'] for r in first), 100)} | "
                 f"{mean_sd((r['before_mia_auc'] for r in first), 1, 3)} |  |  |  |  |  |")
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        lines.append(
            f"| {method} | {mean_sd((r['forget_accuracy'] for r in mine), 100)} | "
            f"{mean_sd((r['retain_accuracy'] for r in mine), 100)} | "
            f"{mean_sd((r['test_accuracy_after'] for r in mine), 100)} | "
            f"{mean_sd((r['mia_auc'] for r in mine), 1, 3)} | {mean_sd((r['fraction_changed'] for r in mine), 100)} "
            f"| {mine[0]['rounds']} | {np.mean([r['round_bytes'] for r in mine]) / 1e6:.1f} | "
            f"{np.mean([r['oneoff_bytes'] for r in mine]) / 1e3:.0f} | {mean_sd((r['seconds'] for r in mine), 1, 0)} |")
    return "\n".join(lines)


def plot_withdrawal(path: Path, rows: list[dict], methods: list[str]) -> None:
    """Bars of forget / retain / test accuracy per method (mean, sd error bars over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in methods if any(r["method"] == m for r in rows)]
    metrics = (("forget_accuracy", "forget"), ("retain_accuracy", "retain"), ("test_accuracy_after", "test"))
    figure, axes = plt.subplots(figsize=(1.6 * len(shown) + 3, 3.6))
    width = 0.8 / len(metrics)
    for offset, (key, label) in enumerate(metrics):
        values = [100 * np.array([r[key] for r in rows if r["method"] == m]) for m in shown]
        axes.bar(np.arange(len(shown)) + offset * width, [v.mean() for v in values], width, label=label,
                 yerr=[v.std(ddof=1) if len(v) > 1 else 0.0 for v in values], capsize=3)
    axes.set_xticks(np.arange(len(shown)) + width * (len(metrics) - 1) / 2, shown)
    axes.set_ylabel("accuracy after unlearning (%)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_withdrawal(out: Path, rows: list[dict], methods: list[str]) -> str:
    """withdrawal.csv, withdrawal.md and withdrawal.png under `out`; returns the markdown table."""
    write_rows(out / "withdrawal.csv", rows)
    table = withdrawal_table(rows, methods)
    (out / "withdrawal.md").write_text(table + "\n")
    plot_withdrawal(out / "withdrawal.png", rows, methods)
    return table


def collect_withdrawal(args: argparse.Namespace) -> None:
    """One withdrawal table from the withdrawal.csv of several runs of this script (e.g. one process per seed)."""
    rows = [row for folder in args.collect for row in read_rows(folder / "withdrawal.csv")]
    methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    print(write_withdrawal(args.out, rows, methods), flush=True)


def part_withdrawal(args: argparse.Namespace, base: dict, scratch: Path) -> None:
    """Every method x seed: phase 1, then phase 2 by resume; the table, CSV and plot."""
    rows: list[dict] = []
    if (args.phase_one is not None or args.oracle_snapshot is not None) and len(args.seeds) != 1:
        raise ValueError("--phase-one and --oracle-snapshot belong to one seed: give exactly one --seeds")
    table = ""
    for seed in args.seeds:
        shared: Path | None = args.phase_one
        for method in args.methods:
            overrides = method_config(base, method, seed, args.rounds, args.oracle_rounds)
            tag = f"withdrawal-{method}-s{seed}"
            try:
                if method == "retrain" and args.oracle_snapshot is not None:
                    rows.append(withdrawal_row(method, seed, truncated_oracle(args.oracle_snapshot, overrides,
                                                                              scratch / tag)))
                    table = write_withdrawal(args.out, rows, args.methods)
                    continue
                if shared is None and method in SHARED_PHASE_ONE_METHODS:
                    phase_one = shared = run_phase_one(overrides, scratch / tag / "phase1")
                else:
                    phase_one = phase_one_for(overrides, shared, scratch / tag / "phase1")
                run = run_phase_two(overrides, phase_one, scratch / tag / "phase2")
            except Exception as err:  # noqa: BLE001  (a method that cannot run is reported; the others go on)
                print(f"[bench_unlearning_federated] {method} seed {seed} FAILED: {type(err).__name__}: {err}",
                      file=sys.stderr, flush=True)
                continue
            rows.append(withdrawal_row(method, seed, run))
            row = rows[-1]
            print(f"[bench_unlearning_federated] {method:10s} seed {seed}  forget {100 * row['forget_accuracy']:.1f}"
                  f"  retain {100 * row['retain_accuracy']:.1f}  test {100 * row['test_accuracy_after']:.1f}  "
                  f"MIA {row['mia_auc']:.3f}  {row['seconds']:.0f} s", flush=True)
            table = write_withdrawal(args.out, rows, args.methods)
    print(table, flush=True)


# -------------------------------------------------------------------------------------------------- score


@dataclasses.dataclass(frozen=True)
class ModelScores:
    """What the forgetting score needs of one phase-2 model: forget-set confidences, retain and test accuracy."""

    confidences: np.ndarray
    retain_accuracy: float
    test_accuracy: float
    forget_accuracy: float


def model_scores(run: PhaseTwo, forget_x: np.ndarray, forget_y: np.ndarray) -> ModelScores:
    """Logit-scaled confidences of the run's final model on the forget set, and its accuracies."""
    from fedsparse.data import load_dataset
    from fedsparse.models import build_model
    from fedsparse.unlearning.core import ArrayData
    from fedsparse.unlearning.evaluate import logit_scaled_confidence, predict_logits

    cfg = _read_config(run.folder)
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    model = build_model(cfg["model"], data.input_shape, data.num_classes, seed=0)
    model.load_state_dict(torch.load(run.folder / "final_model.pt"))
    logits = predict_logits(model, ArrayData(forget_x, forget_y), device=torch.device("cpu"))
    return ModelScores(confidences=logit_scaled_confidence(logits, forget_y),
                       retain_accuracy=float(run.summary["retain_accuracy"]),
                       test_accuracy=float(run.summary["test_accuracy_after"]),
                       forget_accuracy=float(run.summary["forget_accuracy"]))


def _read_config(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())


def forget_set(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """The run's forget set as the experiment defines it (its `forget` attribute): images and labels."""
    from fedsparse.config import resolve
    from server.experiments import EXPERIMENTS

    experiment = EXPERIMENTS["unlearn"](resolve(cfg))
    return experiment.forget.x, experiment.forget.y


def score_models(args: argparse.Namespace, base: dict, method: str, shared: Path, scratch: Path,
                 runs: list[dict]) -> list[ModelScores]:
    """N phase-2 runs of `method` at `--score-seed` from one phase 1 (`phase_one_for`), round offsets of runs
    0 .. N-1."""
    seed = args.score_seed
    overrides = method_config(base, method, seed, args.rounds, args.oracle_rounds)
    phase_one = phase_one_for(overrides, shared, scratch / f"score-{method}" / "phase1")
    forget_x, forget_y = forget_set({**overrides, "output-dir": str(scratch / "unused")})
    models, trained = [], None
    for index in range(args.models):
        run = run_phase_two(overrides, phase_one, scratch / f"score-{method}" / f"run{index}",
                            round_offset=index * ROUND_OFFSET)
        saved = torch.load(run.folder / "checkpoint.pt", weights_only=False)["experiment"]["trained"]
        if trained is None:
            trained = saved
        elif any(not torch.equal(trained[k], saved[k]) for k in trained):
            raise RuntimeError(f"{method}: run {index} did not start phase 2 from the shared trained model")
        models.append(model_scores(run, forget_x, forget_y))
        runs.append({"method": method, "run": index, "round_offset": index * ROUND_OFFSET,
                     "forget_accuracy": models[-1].forget_accuracy, "retain_accuracy": models[-1].retain_accuracy,
                     "test_accuracy": models[-1].test_accuracy, "mia_auc": run.summary["mia_auc"],
                     "seconds": round(run.seconds, 1)})
        print(f"[bench_unlearning_federated] score {method:10s} run {index}  forget "
              f"{100 * models[-1].forget_accuracy:.1f}  test {100 * models[-1].test_accuracy:.1f}  "
              f"{run.seconds:.0f} s", flush=True)
    return models


def score_row(method: str, unlearned: list[ModelScores], retrained: list[ModelScores]) -> tuple[dict, np.ndarray]:
    """The forgetting score of `unlearned` against `retrained` as a CSV row, and the per-example eps."""
    from fedsparse.unlearning.evaluate import forgetting_score

    result = forgetting_score(np.stack([m.confidences for m in unlearned]),
                              np.stack([m.confidences for m in retrained]),
                              unlearned_retain_accuracy=[m.retain_accuracy for m in unlearned],
                              retrained_retain_accuracy=[m.retain_accuracy for m in retrained],
                              unlearned_test_accuracy=[m.test_accuracy for m in unlearned],
                              retrained_test_accuracy=[m.test_accuracy for m in retrained])
    return {"method": method, "models": result.num_models, "forget_examples": len(result.epsilons),
            "score": result.score, "forgetting_quality": result.forgetting_quality,
            "retain_ratio": result.retain_ratio, "test_ratio": result.test_ratio,
            "median_epsilon": float(np.median(result.epsilons)),
            "share_at_cap": float(np.mean(result.epsilons >= result.resolution.score_cutoff)),
            "max_finite_epsilon": result.resolution.max_finite_epsilon,
            "forget_accuracy": float(np.mean([m.forget_accuracy for m in unlearned])),
            "test_accuracy": float(np.mean([m.test_accuracy for m in unlearned]))}, result.epsilons


def score_table(rows: list[dict]) -> str:
    """The markdown table of the score part."""
    lines = [("| method | N | forget examples | score | F | retain ratio | test ratio | median eps | eps >= cutoff % "
             "| forget acc % | test acc % |"), "|---" * 11 + "|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['models']} | {row['forget_examples']} | {row['score']:.3f} | "
                     f"{row['forgetting_quality']:.3f} | {row['retain_ratio']:.3f} | {row['test_ratio']:.3f} | "
                     f"{row['median_epsilon']:.2f} | {100 * row['share_at_cap']:.1f} | "
                     f"{100 * row['forget_accuracy']:.1f} | {100 * row['test_accuracy']:.1f} |")
    return "\n".join(lines)


def plot_epsilons(path: Path, epsilons: dict[str, np.ndarray], cutoff: float) -> None:
    """Histograms of the per-example eps, one per method (eps >= the cutoff scores 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.4))
    bins = np.linspace(0, cutoff + 0.5, 26)
    for method, values in epsilons.items():
        axes.hist(np.minimum(values, cutoff + 0.25), bins=bins, histtype="step", label=method, linewidth=1.5)
    axes.axvline(cutoff, color="grey", lw=0.8, ls="--")
    axes.set_xlabel("per-example eps (clipped; at/after the dashed line H = 0)")
    axes.set_ylabel("forget examples")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def part_score(args: argparse.Namespace, base: dict, scratch: Path) -> None:
    """The competition's forgetting score of every method against N retrained runs."""
    from fedsparse.unlearning.evaluate import epsilon_resolution

    resolution = epsilon_resolution(args.models)
    print(f"[bench_unlearning_federated] score with N = {args.models}: eps resolved up to "
          f"{resolution.max_finite_epsilon:.2f}, H = 0 from eps {resolution.score_cutoff:.0f}, lowest non-zero H "
          f"{resolution.lowest_nonzero_score}", flush=True)
    runs: list[dict] = []
    shared = run_phase_one(method_config(base, "retrain", args.score_seed, args.rounds, args.oracle_rounds),
                           scratch / "score-phase1")
    retrained = score_models(args, base, "retrain", shared, scratch, runs)
    rows, epsilons = [], {}
    for method in [m for m in args.methods if m != "retrain"]:  # retrain is the reference (scoring it needs 2N)
        unlearned = score_models(args, base, method, shared, scratch, runs)
        row, epsilons[method] = score_row(method, unlearned, retrained)
        rows.append(row)
        write_rows(args.out / "score.csv", rows)
        write_rows(args.out / "score_runs.csv", runs)
        (args.out / "score.md").write_text(score_table(rows) + "\n")
        print(score_table(rows), flush=True)
    write_rows(args.out / "score_runs.csv", runs)
    if epsilons:
        plot_epsilons(args.out / "score.png", epsilons, resolution.score_cutoff)


# --------------------------------------------------------------------------------------------------- main


def write_rows(path: Path, rows: list[dict]) -> None:
    """A CSV of dict rows (columns of the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV written by `write_rows`, numbers parsed (`parse_value`)."""
    with path.open(newline="") as handle:
        return [{key: parse_value(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def parse_value(text: str) -> object:
    """A `--set` value: int, float, true/false, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def base_config(args: argparse.Namespace) -> dict:
    """The preset with the benchmark's overrides (`--train-subset`, `--forget`, `--set`)."""
    base = {**preset_config(), "train-subset": args.train_subset}
    if args.forget is not None:
        base["unlearn.forget"] = args.forget
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {item!r}")
        base[key] = parse_value(value)
    return base


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("withdrawal", "score"), default=["withdrawal", "score"])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="unlearn.method values")
    parser.add_argument("--forget", default=None, help="unlearn.forget (default: the experiment's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-subset", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5, help="unlearning rounds of every method but retrain")
    parser.add_argument("--oracle-rounds", type=int, default=0, help="retrain's rounds (0: unlearn.train-rounds)")
    parser.add_argument("--models", type=int, default=8, help="score: N unlearned and N retrained runs")
    parser.add_argument("--score-seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="any run-config override")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_unlearning_federated")
    parser.add_argument("--phase-one", type=Path, metavar="DIR",
                        help="withdrawal, one seed: start every shared method from this phase-1 folder (a copy of "
                             "one this script wrote, or of any run of the seed stopped after phase 1)")
    parser.add_argument("--oracle-snapshot", type=Path, metavar="DIR",
                        help="withdrawal, one seed: retrain's row from this folder of a longer oracle run of the seed "
                             "stopped after --oracle-rounds oracle rounds (truncated_oracle)")
    parser.add_argument("--collect", nargs="+", type=Path, metavar="DIR",
                        help="run nothing: merge the withdrawal.csv of these --out folders into --out")
    args = parser.parse_args(argv)
    if args.models < 3:
        parser.error("--models must be >= 3 (the forgetting score's minimum)")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the chosen parts; results under --out."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fedsparse").setLevel(logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a running app
    base = base_config(args)
    if args.oracle_rounds == 0:
        args.oracle_rounds = int(base["unlearn.train-rounds"])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.collect:
        collect_withdrawal(args)
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_unlearning_federated_") as scratch:
        for part in args.parts:
            {"withdrawal": part_withdrawal, "score": part_score}[part](args, base, Path(scratch))
    print(f"[bench_unlearning_federated] done in {math.ceil(time.perf_counter() - start)} s -> {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
