"""Continual learning as federated rounds: every method on the diverse-domains stream, centralised and federated.

Every run is the continual experiment (`server.experiments.continual`) driven by the real runner
(`server.loop.run_federation`) with the real ClientApp on in-process nodes, each with its own Context
(`server.local_grid.LocalGrid`: what the Flower simulation does, without Ray's start-up cost). Centralised = one
client holding all data (num-clients 1, iid), the SFA paper's setting, through the same code.

Parts (`--parts`, default all):
- `methods`: finetune, sfa (server-side), sfa-client, l2, ewc, replay and the "merge after each task" baselines
  merge-ta, merge-ties, wise-ft (cl.merge-* defaults: TA lambda 1/t, TIES density 0.2, WiSE-FT alpha 0.5) on
  `--stream` (default domains: MNIST -> USPS
  -> Fashion-MNIST -> CIFAR-10, grey 28x28), centralised and federated (10 clients, Dirichlet 0.3), `--seeds`
  seeds; mean +- sd of average accuracy (ACC), average forgetting (FGT) and backward transfer (BWT).
- `sweep`: server-side SFA over p in {0.1, 0.25, 0.5, 1.0} x beta in {0.25, 0.5}, federated, `--sweep-seeds` seeds.
- `optim`: fine-tuning with the clients' optimiser sgd (momentum 0.9), adam, tam, adatam, federated: the accuracy
  on every task seen so far after every round (curves), `--sweep-seeds` seeds.

Writes under `--out` (default results/bench_continual/): `methods.csv`, `sweep.csv`, `optim.csv` (one row per run),
`methods.md` (the table), `matrices/<setting>_<method>_s<seed>.csv` (accuracy matrices), `methods.png` (ACC bars),
`sweep.png`, `optim.png` (curves of the mean accuracy over the tasks seen so far).

Settings: small subsets so the whole benchmark runs in about 20-25 minutes on 2 shared CPU cores: an MLP, 2000
training / 1000 test images a task, 10 rounds a task of 1 local epoch (batch 32, SGD lr 0.05 momentum 0.9; adam lr
0.001, adatam 0.0001: at 0.001 it stays at chance, as in bench_optim). Method knobs: SFA p 0.5, beta 0.25 (server-
and client-side); L2 lambda 0.1, EWC lambda 10 centralised (the centralised demo's picks) and L2 1, EWC 100
federated (one-seed pilots: 0.1 and 10 barely act over a federated task's few local steps; EWC 1000 diverges);
replay 200 examples a client (centralised: 200 in all, federated: 2000 over the 10 clients). No tuning on a
validation split: every knob was picked from a handful of one-seed runs, on test accuracy.

Measured (seeds 0-2, ACC in points; the README has the full table, the sweep and the optimiser figures):
federated finetune 25.2 +- 6.4, sfa 38.1 +- 4.9, sfa-client 38.5 +- 4.1, l2 31.7 +- 4.6, ewc 41.8 +- 3.8, replay
60.7 +- 0.8; centralised finetune 20.1 +- 5.1, sfa 28.0 +- 2.3, l2 49.0 +- 2.1, replay 56.5 +- 2.6. SFA beats
fine-tuning and L2 federated, is level with EWC and far from replay. About 15 minutes for `methods` on 2 cores
shared with other jobs, 5 for `sweep` with one seed, 3 for `optim` with one seed. Merge after each task (a later
run, `--methods finetune merge-ta merge-ties wise-ft`, 938 s; its finetune rows equal the earlier ones): federated
merge-ta 41.2 +- 0.9, merge-ties 41.5 +- 3.8, wise-ft 39.9 +- 3.9; centralised 45.4 +- 2.6, 38.5 +- 1.4,
34.5 +- 1.5: all at or above SFA here, against the SFA paper's claim.

    .venv/bin/python simulations/bench_continual.py                      # everything (~20-25 min, 2 cores)
    .venv/bin/python simulations/bench_continual.py --parts methods --seeds 0
    .venv/bin/python simulations/bench_continual.py --parts methods --methods merge-ta --merge-lambda 1.0 \
        --out results/bench_continual/merge_after_task/ta-lambda1.0
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
METHODS = ("finetune", "sfa", "sfa-client", "l2", "ewc", "replay", "merge-ta", "merge-ties", "wise-ft")
PENALTY = {"centralised": {"l2": 0.1, "ewc": 10.0}, "federated": {"l2": 1.0, "ewc": 100.0}}
SWEEP_P = (0.1, 0.25, 0.5, 1.0)
SWEEP_BETA = (0.25, 0.5)
# optimiser -> lr (momentum 0.9 each); AdaTAM's momentum has no bias correction: at Adam's 1e-3 it diverges
OPTIMIZERS = {"sgd": 0.05, "adam": 0.001, "tam": 0.05, "adatam": 0.0001}
BASE = {"experiment": "continual", "strategy": "fedavg", "dataset": "fashion-mnist", "model": "mlp",
        "local-epochs": 1, "batch-size": 32, "lr": 0.05, "momentum": 0.9,
        "cl.rounds-per-task": 10, "cl.sfa-p": 0.5, "cl.sfa-beta": 0.25, "cl.replay-size": 200,
        "cl.fisher-examples": 200, "cl.train-size": 2000, "cl.test-size": 1000}
SETTINGS = {"centralised": {"num-clients": 1, "partitioner": "iid"},
            "federated": {"num-clients": 10, "partitioner": "dirichlet", "dirichlet-alpha": 0.3}}


def run_once(overrides: dict, workdir: Path) -> dict:
    """One continual run in this process: {"matrix", "tasks", "summary", "rows"}."""
    from fedsparse.config import resolve
    from fedsparse.results import read_rounds
    from fedsparse.tasks import stream_task_names
    from server.local_grid import LocalGrid
    from server.loop import TrainingFailed, run_federation

    settings = {**BASE, **overrides, "output-dir": str(workdir)}
    if "num-rounds" not in settings:  # the continual experiment wants tasks x cl.rounds-per-task
        draft = resolve(settings)
        settings["num-rounds"] = len(stream_task_names(draft["cl.stream"], draft)) * draft["cl.rounds-per-task"]
    cfg = resolve(settings)
    try:
        summary = run_federation(LocalGrid(cfg), cfg)
    except TrainingFailed as err:  # e.g. a penalty too strong for the lr: the run diverged; recorded as NaN
        print(f"[bench_continual] {overrides}: {err}", file=sys.stderr)
        names = stream_task_names(cfg["cl.stream"], cfg)
        nan = float("nan")
        return {"matrix": np.full((len(names), len(names)), nan), "tasks": names, "rows": [],
                "summary": {"average_accuracy": nan, "average_forgetting": nan, "backward_transfer": nan,
                            "bytes_oneoff": 0}}
    matrix = np.array([[np.nan if v is None else v for v in row] for row in summary["accuracy_matrix"]])
    return {"matrix": matrix, "tasks": summary["cl_tasks"], "summary": summary,
            "rows": read_rounds(workdir / "rounds.csv")}


def method_overrides(method: str, penalty: dict[str, float], merge: dict[str, float] | None = None) -> dict:
    """The cl.* settings of one method (`penalty`: the strength of l2 and ewc; `merge`: cl.merge-* keys set on
    the command line, for the merge-after-task methods)."""
    overrides: dict = {"cl.method": method}
    if method in penalty:
        overrides["cl.penalty"] = penalty[method]
    if method in ("merge-ta", "merge-ties", "wise-ft"):
        overrides.update(merge or {})
    return overrides


def mean_sd(values: list[float]) -> str:
    """'mean +- sd' in points (sd over seeds, ddof 1; '-' for one seed); 'diverged (k of n)' if any run did."""
    points = 100 * np.asarray(values, dtype=float)
    if np.isnan(points).any():
        return f"diverged ({int(np.isnan(points).sum())} of {len(points)})"
    spread = f"{points.std(ddof=1):.1f}" if len(points) > 1 else "-"
    return f"{points.mean():.1f} +- {spread}"


def write_rows(path: Path, rows: list[dict]) -> None:
    """A CSV of dict rows (columns of the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def seen_tasks_accuracy(rows: list[dict], tasks: list[str]) -> list[float]:
    """Per round: the mean accuracy over the tasks evaluated that round (the tasks seen so far)."""
    curve = []
    for row in rows:
        values = [float(row[f"acc/{t}"]) for t in tasks if row.get(f"acc/{t}") not in (None, "")]
        curve.append(float(np.mean([value for value in values if math.isfinite(value)])))
    return curve


def part_methods(args: argparse.Namespace, scratch: Path) -> None:
    """Every method, centralised and federated, several seeds: the table and the matrices."""
    from fedsparse.continual.metrics import write_matrix_csv

    runs = []
    penalties = {setting: dict(values) for setting, values in PENALTY.items()}
    for name in ("l2", "ewc"):
        if getattr(args, name) is not None:
            for values in penalties.values():
                values[name] = getattr(args, name)
    merge = {f"cl.merge-{name}": getattr(args, f"merge_{name}") for name in ("lambda", "alpha", "density")
             if getattr(args, f"merge_{name}") is not None}
    for setting in args.settings:
        setting_overrides = SETTINGS[setting]
        for method in args.methods:
            for seed in args.seeds:
                start = time.perf_counter()
                result = run_once({**setting_overrides, **method_overrides(method, penalties[setting], merge),
                                   "seed": seed,
                                   "cl.stream": args.stream}, scratch / f"{setting}-{method}-{seed}")
                summary = result["summary"]
                if not np.isnan(summary["average_accuracy"]):  # a diverged run has no matrix
                    write_matrix_csv(args.out / "matrices" / f"{setting}_{method}_s{seed}.csv", result["matrix"],
                                     result["tasks"])
                runs.append({"setting": setting, "method": method, "seed": seed,
                             "average_accuracy": summary["average_accuracy"],
                             "average_forgetting": summary["average_forgetting"],
                             "backward_transfer": summary["backward_transfer"],
                             "bytes_oneoff": summary["bytes_oneoff"],
                             "seconds": round(time.perf_counter() - start, 1)})
                print(f"[bench_continual] {setting:11s} {method:10s} seed {seed}  ACC "
                      f"{100 * summary['average_accuracy']:.1f}  FGT {100 * summary['average_forgetting']:.1f}  "
                      f"{runs[-1]['seconds']:.0f} s", flush=True)
    write_rows(args.out / "methods.csv", runs)
    lines = ["| setting | method | ACC | FGT | BWT |", "|---|---|---|---|---|"]
    for setting in args.settings:
        for method in args.methods:
            chosen = [r for r in runs if r["setting"] == setting and r["method"] == method]
            lines.append(f"| {setting} | {method} | {mean_sd([r['average_accuracy'] for r in chosen])} | "
                         f"{mean_sd([r['average_forgetting'] for r in chosen])} | "
                         f"{mean_sd([r['backward_transfer'] for r in chosen])} |")
    table = "\n".join(lines)
    (args.out / "methods.md").write_text(table + "\n")
    print(table, flush=True)
    plot_methods(args.out / "methods.png", runs, args.methods, args.settings)


def plot_methods(path: Path, runs: list[dict], methods: list[str], settings: list[str]) -> None:
    """Bars of ACC (mean, sd error bars) per method, one group per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(settings)
    for offset, setting in enumerate(settings):
        means, sds = [], []
        for method in methods:
            values = 100 * np.array([r["average_accuracy"] for r in runs
                                     if r["setting"] == setting and r["method"] == method])
            means.append(values.mean())
            sds.append(values.std(ddof=1) if len(values) > 1 else 0.0)
        axes.bar(np.arange(len(methods)) + offset * width, means, width, yerr=sds, label=setting, capsize=3)
    axes.set_xticks(np.arange(len(methods)) + width * (len(settings) - 1) / 2, methods)
    axes.set_ylabel("average accuracy after the last task (%)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def part_sweep(args: argparse.Namespace, scratch: Path) -> None:
    """Server-side SFA over p x beta, federated."""
    runs = []
    for beta in SWEEP_BETA:
        for p in SWEEP_P:
            for seed in args.sweep_seeds:
                result = run_once({**SETTINGS["federated"], "cl.method": "sfa", "cl.sfa-p": p, "cl.sfa-beta": beta,
                                   "seed": seed, "cl.stream": args.stream}, scratch / f"sweep-{p}-{beta}-{seed}")
                summary = result["summary"]
                runs.append({"p": p, "beta": beta, "seed": seed, "average_accuracy": summary["average_accuracy"],
                             "average_forgetting": summary["average_forgetting"]})
                print(f"[bench_continual] sweep p {p} beta {beta} seed {seed}  ACC "
                      f"{100 * summary['average_accuracy']:.1f}", flush=True)
    write_rows(args.out / "sweep.csv", runs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.4))
    for beta in SWEEP_BETA:
        means = [100 * np.mean([r["average_accuracy"] for r in runs if r["p"] == p and r["beta"] == beta])
                 for p in SWEEP_P]
        axes.plot(SWEEP_P, means, marker="o", label=f"beta {beta}")
    axes.set_xscale("log")
    axes.set_xticks(SWEEP_P, [str(p) for p in SWEEP_P])
    axes.set_xlabel("p (fraction of a task's rounds between averagings)")
    axes.set_ylabel("ACC (%)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out / "sweep.png", dpi=110)
    plt.close(figure)


def part_optim(args: argparse.Namespace, scratch: Path) -> None:
    """Fine-tuning through the stream with each client optimiser: curves of the seen tasks' mean accuracy."""
    runs, curves = [], {}
    for name, lr in OPTIMIZERS.items():
        per_seed = []
        for seed in args.sweep_seeds:
            result = run_once({**SETTINGS["federated"], "cl.method": "finetune", "optimizer": name, "lr": lr,
                               "seed": seed, "cl.stream": args.stream}, scratch / f"optim-{name}-{seed}")
            per_seed.append(seen_tasks_accuracy(result["rows"], result["tasks"]))
            runs.append({"optimizer": name, "lr": lr, "seed": seed,
                         "average_accuracy": result["summary"]["average_accuracy"],
                         "average_forgetting": result["summary"]["average_forgetting"],
                         "final_seen_accuracy": per_seed[-1][-1]})
            print(f"[bench_continual] optimizer {name} seed {seed}  ACC "
                  f"{100 * result['summary']['average_accuracy']:.1f}", flush=True)
        curves[name] = np.mean(per_seed, axis=0)
    write_rows(args.out / "optim.csv", runs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.6))
    for name, curve in curves.items():
        axes.plot(np.arange(1, len(curve) + 1), 100 * curve, label=name)
    rounds = BASE["cl.rounds-per-task"]
    for boundary in range(rounds, len(next(iter(curves.values()))), rounds):
        axes.axvline(boundary + 0.5, color="grey", lw=0.5)
    axes.set_xlabel(f"round (a new task every {rounds})")
    axes.set_ylabel("mean accuracy on the tasks seen (%)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out / "optim.png", dpi=110)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("methods", "sweep", "optim"),
                        default=["methods", "sweep", "optim"])
    parser.add_argument("--stream", default="domains")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sweep-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--l2", type=float, help="cl.penalty of every l2 run (default: PENALTY per setting)")
    parser.add_argument("--ewc", type=float, help="cl.penalty of every ewc run (default: PENALTY per setting)")
    parser.add_argument("--merge-lambda", type=float, help="cl.merge-lambda of merge-ta (default 0: 1 / tasks)")
    parser.add_argument("--merge-alpha", type=float, help="cl.merge-alpha of wise-ft (default 0.5)")
    parser.add_argument("--merge-density", type=float, help="cl.merge-density of merge-ties (default 0.2)")
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_continual")
    return parser.parse_args()


def main() -> None:
    """Run the chosen parts; results under --out."""
    args = parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fedsparse").setLevel(logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a running app
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_continual_") as scratch:
        for part in args.parts:
            {"methods": part_methods, "sweep": part_sweep, "optim": part_optim}[part](args, Path(scratch))
    print(f"[bench_continual] done in {math.ceil(time.perf_counter() - start)} s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
