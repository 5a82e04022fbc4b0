"""Merging as the aggregation of ordinary FL rounds: FedAvg against TIES and DARE aggregation on the non-IID benchmark.

Every run is the standard experiment driven by the real runner (`server.loop.run_federation`) with the real
ClientApp in this process (`server.local_grid.LocalGrid`: what the Flower simulation does, without Ray's start-up
cost; the README's figures were measured with bench_continual's earlier in-process grid of the same handlers).
Only the strategy differs: `fedavg` (example-weighted mean of the updates), `ties` (trim each update to its top
`aggregate.density` by magnitude, elect signs, disjoint mean; unweighted) and `dare` (drop each update entry with
probability `aggregate.drop`, rescale, example-weighted mean); lambda 1 for both
(`server/strategies/merge_aggregation.py`).

Settings (the README's non-IID benchmark, cut to fit 2 shared CPU cores): Fashion-MNIST (first `--train-subset`
training images, the full 10k test set), `cnn`, 10 clients all trained every round, Dirichlet 0.3, `--rounds`
rounds of 1 local epoch (batch 32, SGD lr 0.05 momentum 0.9), seeds `--seeds`. Every strategy sends the dense
float32 model both ways, so the bytes are equal (the table shows them).

Writes under `--out` (default results/bench_merge_aggregation/): `runs.csv` (one row per run), `rounds.csv` (test
accuracy per round, run and strategy), `table.md` (final and best accuracy mean +- sd over the seeds, MB per run),
`accuracy.png` (mean accuracy per round, sd band).

    .venv/bin/python simulations/bench_merge_aggregation.py                       # 3 strategies x seeds 0 1 2
    .venv/bin/python simulations/bench_merge_aggregation.py --strategies fedavg ties --seeds 0 --rounds 2
    .venv/bin/python simulations/bench_merge_aggregation.py --seeds 2 --out /tmp/seed2   # a second process, then:
    .venv/bin/python simulations/bench_merge_aggregation.py --combine results/bench_merge_aggregation /tmp/seed2
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ("fedavg", "ties", "dare")
BASE = {"experiment": "standard", "dataset": "fashion-mnist", "model": "cnn", "num-clients": 10,
        "partitioner": "dirichlet", "dirichlet-alpha": 0.3, "fraction-train": 1.0, "local-epochs": 1,
        "batch-size": 32, "lr": 0.05, "momentum": 0.9}


def run_once(strategy: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One federated run in this process: {"summary": summary.json's dict, "curve": test accuracy per round}."""
    from fedsparse.config import resolve
    from fedsparse.results import read_rounds
    from server.local_grid import LocalGrid
    from server.loop import run_federation

    cfg = resolve({**BASE, "strategy": strategy, "seed": seed, "num-rounds": args.rounds,
                   "train-subset": args.train_subset, "output-dir": str(workdir)})
    summary = run_federation(LocalGrid(cfg), cfg)
    curve = [float(row["test_accuracy"]) for row in read_rounds(workdir / "rounds.csv")]
    return {"summary": summary, "curve": curve}


def mean_sd(values: list[float]) -> str:
    """'mean +- sd' in points (sd over seeds, ddof 1; '-' for one seed)."""
    points = 100 * np.asarray(values, dtype=float)
    spread = f"{points.std(ddof=1):.2f}" if len(points) > 1 else "-"
    return f"{points.mean():.2f} +- {spread}"


def write_csv(path: Path, rows: list[dict]) -> None:
    """A CSV of dict rows (columns of the first row)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def table(runs: list[dict], strategies: list[str]) -> str:
    """The markdown table: per strategy, final and best accuracy (mean +- sd), MB down and up per run, seeds."""
    lines = ["| aggregation | final acc % | best acc % | MB down / run | MB up / run | seeds | s / run |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for strategy in strategies:
        chosen = [r for r in runs if r["strategy"] == strategy]
        if not chosen:
            continue
        lines.append(f"| {strategy} | {mean_sd([r['final_accuracy'] for r in chosen])} | "
                     f"{mean_sd([r['best_accuracy'] for r in chosen])} | "
                     f"{np.mean([r['bytes_down'] for r in chosen]) / 1e6:.2f} | "
                     f"{np.mean([r['bytes_up'] for r in chosen]) / 1e6:.2f} | {len(chosen)} | "
                     f"{np.mean([r['seconds'] for r in chosen]):.0f} |")
    return "\n".join(lines)


def plot(path: Path, curves: dict[str, list[list[float]]]) -> None:
    """Mean test accuracy per round for each strategy, with a +- sd band over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4))
    for strategy, runs in curves.items():
        values = 100 * np.array(runs)
        mean = values.mean(0)
        spread = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
        rounds = np.arange(1, len(mean) + 1)
        axes.plot(rounds, mean, marker="o", label=f"{strategy} ({len(values)} seeds)")
        axes.fill_between(rounds, mean - spread, mean + spread, alpha=0.2)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Fashion-MNIST, cnn, 10 clients, Dirichlet 0.3")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """Run every (strategy, seed), write the files, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--train-subset", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_merge_aggregation")
    parser.add_argument("--combine", nargs="+", type=Path, default=None, metavar="DIR",
                        help="run nothing: write --out's files from the runs.csv / rounds.csv of these folders "
                             "(seeds run by separate processes)")
    args = parser.parse_args(argv)
    if args.combine:
        combine(args)
        return
    torch.set_num_threads(1)
    logging.getLogger("fedsparse").setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a running app
    runs, round_rows, curves = [], [], {s: [] for s in args.strategies}
    with tempfile.TemporaryDirectory(prefix="bench_merge_aggregation_") as scratch:
        for seed in args.seeds:  # seed-major: a partial run still has every strategy on the first seeds
            for strategy in args.strategies:
                start = time.perf_counter()
                result = run_once(strategy, seed, args, Path(scratch) / f"{strategy}-{seed}")
                summary = result["summary"]
                runs.append({"strategy": strategy, "seed": seed, "rounds": args.rounds,
                             "train_subset": args.train_subset, "final_accuracy": summary["final_accuracy"],
                             "best_accuracy": summary["best_accuracy"], "bytes_down": summary["bytes_down"],
                             "bytes_up": summary["bytes_up"], "seconds": round(time.perf_counter() - start, 1)})
                curves[strategy].append(result["curve"])
                round_rows += [{"strategy": strategy, "seed": seed, "round": index + 1, "test_accuracy": accuracy}
                               for index, accuracy in enumerate(result["curve"])]
                print(f"[bench_merge_aggregation] {strategy:6s} seed {seed}  final "
                      f"{100 * summary['final_accuracy']:.2f}%  best {100 * summary['best_accuracy']:.2f}%  "
                      f"{runs[-1]['seconds']:.0f} s", flush=True)
                write_outputs(args, runs, round_rows, curves)  # after every run: a partial benchmark keeps its rows
    print(table(runs, args.strategies), flush=True)


def write_outputs(args: argparse.Namespace, runs: list[dict], round_rows: list[dict],
                  curves: dict[str, list[list[float]]]) -> None:
    """runs.csv, rounds.csv, table.md (with the settings and the seeds done) and accuracy.png of the runs so far."""
    write_csv(args.out / "runs.csv", runs)
    write_csv(args.out / "rounds.csv", round_rows)
    seeds_done = sorted({r["seed"] for r in runs})
    settings = (f"Fashion-MNIST (first {args.train_subset} training images), cnn, 10 clients, Dirichlet 0.3, "
                f"{args.rounds} rounds of 1 local epoch, SGD lr 0.05 momentum 0.9, seeds "
                f"{' '.join(map(str, seeds_done))}; ties density 0.2, dare drop 0.5, lambda 1")
    (args.out / "table.md").write_text(f"{settings}\n\n{table(runs, args.strategies)}\n")
    plot(args.out / "accuracy.png", {s: c for s, c in curves.items() if c})


def combine(args: argparse.Namespace) -> None:
    """Write --out's files from the runs of several folders (same rounds and train subset; each run once)."""
    import csv

    runs, round_rows = [], []
    for folder in args.combine:
        with (folder / "runs.csv").open() as handle:
            runs += [{**row, "seed": int(row["seed"]), "rounds": int(row["rounds"]),
                      "train_subset": int(row["train_subset"]), "final_accuracy": float(row["final_accuracy"]),
                      "best_accuracy": float(row["best_accuracy"]), "bytes_down": int(row["bytes_down"]),
                      "bytes_up": int(row["bytes_up"]), "seconds": float(row["seconds"])}
                     for row in csv.DictReader(handle)]
        with (folder / "rounds.csv").open() as handle:
            round_rows += [{**row, "seed": int(row["seed"]), "round": int(row["round"]),
                            "test_accuracy": float(row["test_accuracy"])} for row in csv.DictReader(handle)]
    keys = [(r["strategy"], r["seed"]) for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a (strategy, seed) appears twice in {args.combine}")
    if len({(r["rounds"], r["train_subset"]) for r in runs}) != 1:
        raise ValueError("the folders' runs differ in rounds or train subset")
    args.rounds, args.train_subset = runs[0]["rounds"], runs[0]["train_subset"]
    order = {name: index for index, name in enumerate(STRATEGIES)}
    runs.sort(key=lambda r: (r["seed"], order[r["strategy"]]))
    round_rows.sort(key=lambda r: (r["seed"], order[r["strategy"]], r["round"]))
    args.strategies = [name for name in STRATEGIES if any(r["strategy"] == name for r in runs)]
    curves = {name: [[r["test_accuracy"] for r in round_rows if (r["strategy"], r["seed"]) == (name, run["seed"])]
                     for run in runs if run["strategy"] == name] for name in args.strategies}
    write_outputs(args, runs, round_rows, curves)
    print(table(runs, args.strategies), flush=True)


if __name__ == "__main__":
    main()
