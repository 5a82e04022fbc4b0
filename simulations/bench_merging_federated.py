"""Model merging as federated rounds: every merge method x alignment x TACT (x per-task heads) on the same experts.

For each seed and setting (`local`: preset `merge-local`, experts fine-tuned from one shared initial model;
`nonlocal`: preset `merge-nonlocal`, each expert from its own seed) the experts are trained ONCE through the real
merge experiment (`server.experiments.merging`, `server.loop.run_federation`) with the real ClientApp on in-process
nodes (`server.local_grid.LocalGrid`, as `bench_continual.py` does). Then every entry of
`fedsparse.merging.MERGE_METHODS` (task_arithmetic, average, ties, dare_ta, dare_ties) is applied to those experts
in four columns:

- `plain`: `MergeExperiment.merge` with `merge.align = false`;
- `aligned`: the same with `merge.align = true` (weight matching of every expert and its initial model to the first);
- `TACT`: plain, then every client's own `query.merge_tact` handler fits its task's per-channel corrections of the
  merged model (from its kept expert, on `merge.tact-examples` of its data) and the task's evaluator applies them;
- `aligned+TACT`: aligned, and the TACT request carries the client's permutation (its expert's statistics in the
  merged model's channel order).

With heads `task` (`merge.task-heads = true`) the head is left out of the merge and task i is scored with expert
i's head; with `shared` (the presets' default) the head is merged like every other layer. Every score is the
experiment's own evaluator of that task (`CorrectedEvaluator`), so it is exactly what a `fedsparse run` with those
settings would report for those experts. Normalized accuracy = merged accuracy / the expert's accuracy on its task.

Settings: the presets as they are (domains stream: MNIST, USPS, Fashion-MNIST, CIFAR-10 grey, 28x28; 2000 training /
1000 test images a task; cnn; 4 clients = 4 experts; 1 round of 3 epochs, batch 32, SGD lr 0.05 momentum 0.9;
lambda = each method's own; TACT on 500 calibration images a client).

Writes under `--out` (default results/bench_merging_federated/): `rows.csv` (one row per seed x setting x method x
column x heads x task: merged, expert and normalized accuracy), `table.md` (mean normalized accuracy over the tasks,
mean +- sd over seeds, one table per setting and heads, and the TACT gains the issue's target is about),
`normalized.png` (grouped bars with sd error bars), and `experts/<setting>-s<seed>.pt` (the trained experts: a
rerun with the same settings reuses them instead of training again; `--retrain` ignores them).

    .venv/bin/python simulations/bench_merging_federated.py                       # seeds 0 1 2, both settings
    .venv/bin/python simulations/bench_merging_federated.py --seeds 0 --settings nonlocal --heads shared
    # seeds in parallel processes, then one table from their rows:
    .venv/bin/python simulations/bench_merging_federated.py --seeds 1 --out results/bench_merging_federated/s1
    .venv/bin/python simulations/bench_merging_federated.py --combine results/bench_merging_federated/s*/rows.csv

Measured on 2 CPU cores shared with ~8 other jobs (load 20-26), per seed and setting: expert training 2-4 minutes,
the columns 8-11 minutes per heads setting (the TACT fits and the evaluations). The README has the tables.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"local": "merge-local", "nonlocal": "merge-nonlocal"}
COLUMNS = {"plain": (False, False), "aligned": (True, False), "TACT": (False, True), "aligned+TACT": (True, True)}
HEADS = {"shared": False, "task": True}

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Experts:
    """What one federated expert run leaves: the server's experts (partition -> state, what it merges), each
    client's kept expert (partition -> state, what its TACT handler reads) and each expert's accuracy on its task."""

    server: dict[int, StateDict]
    clients: dict[int, StateDict]
    accuracy: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class Row:
    """One task's score for one merge (a line of rows.csv)."""

    setting: str
    seed: int
    method: str
    column: str
    heads: str
    task: str
    merged_accuracy: float
    expert_accuracy: float
    normalized: float


def preset_config(setting: str, seed: int, workdir: Path, overrides: list[str]) -> dict:
    """The resolved config of `setting`'s preset with this seed and the `KEY=VALUE` overrides (TOML values),
    writing its run files under `workdir`."""
    from fedsparse.config import resolve

    raw = tomllib.loads((REPO / "simulations" / "presets" / f"{PRESETS[setting]}.toml").read_text())
    for item in overrides:
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        raw[key.strip()] = tomllib.loads(f"value = {value}")["value"]
    return resolve({**raw, "seed": seed, "output-dir": str(workdir)})


@contextmanager
def recording_merge_experiments() -> Iterator[list]:
    """While active, every merge experiment the runner builds is appended to the yielded list."""
    from server.experiments import EXPERIMENTS
    from server.experiments.merging import MergeExperiment

    built: list[MergeExperiment] = []

    def build(cfg: dict) -> MergeExperiment:
        built.append(MergeExperiment(cfg))
        return built[-1]

    build.config_namespaces = MergeExperiment.config_namespaces  # type: ignore[attr-defined]
    build.check_config = MergeExperiment.check_config  # type: ignore[attr-defined]
    original = EXPERIMENTS["merge"]
    EXPERIMENTS["merge"] = build
    try:
        yield built
    finally:
        EXPERIMENTS["merge"] = original


def train_experts(cfg: dict) -> Experts:
    """One federated merge run of `cfg` in this process; the experts it trained."""
    from client.merging import EXPERT
    from server.local_grid import LocalGrid
    from server.loop import run_federation

    start = time.perf_counter()
    grid = LocalGrid(cfg, first_node_id=1000)
    with recording_merge_experiments() as built:
        summary = run_federation(grid, cfg)
    server = {p: {k: v.clone() for k, v in state.items()} for p, state in built[-1].strategy.experts.items()}
    clients = {grid.partition(node): context.state[EXPERT].to_torch_state_dict()
               for node, context in grid.contexts.items()}
    return Experts(server, clients, dict(summary["expert_accuracy"]), time.perf_counter() - start)


def load_or_train(cfg: dict, path: Path, retrain: bool) -> Experts:
    """The experts of `cfg` from `path` if saved there (and not `retrain`), else trained and saved."""
    if path.exists() and not retrain:
        return Experts(**torch.load(path))
    experts = train_experts(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(asdict(experts), path)
    return experts


def client_state(expert: StateDict) -> RecordDict:
    """A client's Context.state holding `expert` as its kept expert (what its TACT handler reads)."""
    from client.merging import EXPERT

    return RecordDict({EXPERT: ArrayRecord({k: Array(np.ascontiguousarray(v.numpy())) for k, v in expert.items()})})


def score_columns(cfg: dict, experts: Experts, setting: str, methods: list[str], heads: list[str]) -> list[Row]:
    """Every method x column x heads on these experts, through the experiment's merge, the clients' TACT handler
    and the experiment's evaluators."""
    from client.handlers import HANDLERS
    from client.merging import TACT_MESSAGE
    from server.experiments.merging import MergeExperiment

    experiment = MergeExperiment(cfg)
    states = {partition: client_state(expert) for partition, expert in experts.clients.items()}
    rows = []
    for method in methods:
        for head_name in heads:
            for align in (False, True):
                experiment.cfg = {**cfg, "merge.method": method, "merge.align": align,
                                  "merge.task-heads": HEADS[head_name]}
                merged = experiment.merge(experts.server)
                experiment.model.load_state_dict(merged)
                for column, (column_align, tact) in COLUMNS.items():
                    if column_align != align:
                        continue
                    experiment.corrections.clear()
                    if tact:  # each client's own handler, on its kept expert
                        record = ArrayRecord(merged)
                        for partition, task in enumerate(experiment.tasks):
                            reply = HANDLERS[TACT_MESSAGE](experiment.tact_request(partition, record),
                                                           states[partition], cfg, partition)
                            experiment.corrections[task.name] = experiment.read_corrections(reply)
                    for task, evaluator in zip(experiment.tasks, experiment.phases[0].evaluators):
                        accuracy = evaluator(experiment.model)[f"acc/{task.name}"]
                        expert = experts.accuracy[task.name]
                        rows.append(Row(setting, cfg["seed"], method, column, head_name, task.name, accuracy, expert,
                                        accuracy / expert))
    return rows


def mean_normalized(rows: list[Row]) -> dict[tuple, float]:
    """(setting, seed, method, column, heads) -> the mean normalized accuracy over the tasks."""
    grouped: dict[tuple, list[float]] = {}
    for row in rows:
        grouped.setdefault((row.setting, row.seed, row.method, row.column, row.heads), []).append(row.normalized)
    return {key: float(np.mean(values)) for key, values in grouped.items()}


def over_seeds(means: dict[tuple, float], setting: str, method: str, column: str, heads: str) -> np.ndarray:
    """The per-seed mean normalized accuracies (in points) of one cell."""
    return 100 * np.array([value for (s, _, m, c, h), value in sorted(means.items())
                           if (s, m, c, h) == (setting, method, column, heads)])


def mean_sd(points: np.ndarray) -> str:
    """'mean ± sd' (sd over seeds, ddof 1; '-' for one seed; 'n/a' for none)."""
    if len(points) == 0:
        return "n/a"
    spread = f"{points.std(ddof=1):.1f}" if len(points) > 1 else "-"
    return f"{points.mean():.1f} ± {spread}"


def table(rows: list[Row], methods: list[str], heads: list[str]) -> str:
    """The markdown tables (one per setting and heads) and the TACT gains in the non-local setting."""
    means = mean_normalized(rows)
    lines = []
    for setting in PRESETS:
        for head_name in heads:
            seeds = sorted({r.seed for r in rows if r.setting == setting and r.heads == head_name})
            if not seeds:
                continue
            title = (f"{setting}, heads {head_name}, seeds {' '.join(map(str, seeds))}: mean normalized accuracy over "
                     "the tasks, % (mean ± sd over seeds)")
            lines += [title, "",
                      "| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
            for method in methods:
                cells = [mean_sd(over_seeds(means, setting, method, column, head_name)) for column in COLUMNS]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
        experts = {}
        for row in rows:
            if row.setting == setting:
                experts.setdefault(row.task, {})[row.seed] = row.expert_accuracy
        if experts:
            lines += [f"{setting} experts' accuracy (mean over seeds): " + ", ".join(
                f"{task} {np.mean(list(by_seed.values())):.3f}" for task, by_seed in experts.items()), ""]
    lines += ["Non-local TACT gains, points (mean ± sd over seeds of the per-seed difference):", "",
              "| method | heads | TACT - plain | TACT - aligned | aligned+TACT - aligned | aligned+TACT - plain |",
              "|---|---|---|---|---|---|"]
    for method in ("task_arithmetic", "ties"):
        for head_name in heads:
            cell = {column: over_seeds(means, "nonlocal", method, column, head_name) for column in COLUMNS}
            if any(len(values) == 0 for values in cell.values()):
                continue
            lines.append(f"| {method} | {head_name} | {mean_sd(cell['TACT'] - cell['plain'])} | "
                         f"{mean_sd(cell['TACT'] - cell['aligned'])} | "
                         f"{mean_sd(cell['aligned+TACT'] - cell['aligned'])} | "
                         f"{mean_sd(cell['aligned+TACT'] - cell['plain'])} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[Row], methods: list[str], heads: list[str]) -> None:
    """Grouped bars of mean normalized accuracy (sd error bars): one panel per setting and heads, a group per
    method, a bar per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_normalized(rows)
    panels = [(s, h) for s in PRESETS for h in heads if any(r.setting == s and r.heads == h for r in rows)]
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    width = 0.8 / len(COLUMNS)
    for axis, (setting, head_name) in zip(axes[:, 0], panels):
        for offset, column in enumerate(COLUMNS):
            cells = [over_seeds(means, setting, method, column, head_name) for method in methods]
            axis.bar(np.arange(len(methods)) + offset * width, [c.mean() for c in cells], width,
                     yerr=[c.std(ddof=1) if len(c) > 1 else 0.0 for c in cells], capsize=2, label=column)
        axis.set_xticks(np.arange(len(methods)) + width * (len(COLUMNS) - 1) / 2, methods)
        axis.set_ylabel("normalized acc. (%)")
        axis.set_ylim(0, 110)
        axis.set_title(f"{setting} experts, heads {head_name}", fontsize=10)
        axis.legend(fontsize=8, ncol=len(COLUMNS), loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(out: Path, rows: list[Row], methods: list[str], heads: list[str]) -> str:
    """rows.csv, table.md and normalized.png under `out`; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "rows.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    text = table(rows, methods, heads)
    (out / "table.md").write_text(text)
    plot(out / "normalized.png", rows, methods, heads)
    return text


def read_rows(paths: list[Path]) -> list[Row]:
    """The rows of earlier runs' rows.csv files (e.g. one per seed, run in parallel)."""
    rows = []
    for path in paths:
        with path.open(newline="") as handle:
            for raw in csv.DictReader(handle):
                rows.append(Row(raw["setting"], int(raw["seed"]), raw["method"], raw["column"], raw["heads"],
                                raw["task"], float(raw["merged_accuracy"]), float(raw["expert_accuracy"]),
                                float(raw["normalized"])))
    return rows


def parse_args() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    from fedsparse.merging import MERGE_METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=tuple(PRESETS), default=list(PRESETS))
    parser.add_argument("--methods", nargs="+", choices=tuple(MERGE_METHODS), default=list(MERGE_METHODS))
    parser.add_argument("--heads", nargs="+", choices=tuple(HEADS), default=list(HEADS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override preset keys (TOML values), e.g. merge.train-size=200; for smoke runs")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="ROWS_CSV",
                        help="train nothing: write the table and plot of these rows.csv files under --out")
    parser.add_argument("--retrain", action="store_true", help="train the experts even if saved under --out")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_merging_federated")
    return parser.parse_args()


def main() -> None:
    """Train (or load) the experts per seed and setting, score every column, write the results after each."""
    args = parse_args()
    if args.combine:
        rows = read_rows(args.combine)
        print(write_outputs(args.out, rows, [m for m in args.methods if any(r.method == m for r in rows)],
                            [h for h in args.heads if any(r.heads == h for r in rows)]), flush=True)
        return
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fedsparse").setLevel(logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a running app
    start = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_merging_federated_") as scratch:
        for seed in args.seeds:  # seed-major: an interrupted run still has every setting for the seeds it did
            for setting in args.settings:
                cfg = preset_config(setting, seed, Path(scratch) / f"{setting}-{seed}", args.set)
                experts = load_or_train(cfg, args.out / "experts" / f"{setting}-s{seed}.pt", args.retrain)
                began = time.perf_counter()
                rows += score_columns(cfg, experts, setting, args.methods, args.heads)
                print(f"[bench_merging_federated] {setting} seed {seed}: experts {experts.seconds:.0f} s, columns "
                      f"{time.perf_counter() - began:.0f} s", flush=True)
                text = write_outputs(args.out, rows, args.methods, args.heads)
    print(text, flush=True)
    print(f"[bench_merging_federated] done in {math.ceil(time.perf_counter() - start)} s -> {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
