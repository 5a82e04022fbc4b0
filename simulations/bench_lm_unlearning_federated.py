"""Benchmark: a client of the federated char GPT asks to forget ID passages or OOD canaries (experiment lm-unlearn).

For every forget set (ID: passages of the client's own text; OOD: random-character canaries inserted into it), every
method (retrain = the oracle, finetune, gradient_ascent with all clients, gradient_ascent by the forgetting client
alone) and every seed, one in-process run (`server.local_grid.LocalGrid`, the real ClientApp, no Ray) of
`--train-rounds` training rounds and `--rounds` unlearning rounds (retrain: `--train-rounds`, as the oracle retrains
for as long as the model was trained). Writes into `--out`:
- `runs/<set>-<method>-s<seed>/` (each run's rounds.csv, summary.json, lmu_trace.csv / .png);
- `results.json` (settings, wall time, every run's trace);
- `table.md` (per set and method, mean over seeds: forget quality, its AUC, extraction, forget / twin loss, validation
  perplexity before and after, the first round where quality >= 0.5 and the perplexity there, bytes);
- `trace.png` (forget quality and validation perplexity per unlearning round, ID vs OOD, mean over seeds).

Usage: .venv/bin/python simulations/bench_lm_unlearning_federated.py --out results/bench_lm_unlearn_fed
       (add --from-results to rewrite table.md and trace.png from results.json without running)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

FORGET_SETS = ("id", "ood")
METHODS = {  # label -> lmu.* settings
    "retrain": {"method": "retrain", "participants": "all"},
    "finetune": {"method": "finetune", "participants": "all"},
    "ga-all": {"method": "gradient_ascent", "participants": "all"},
    "ga-client": {"method": "gradient_ascent", "participants": "client"},
}


def run_config(args: argparse.Namespace, forget: str, label: str, seed: int, out: Path) -> dict:
    """The resolved config of one run."""
    from fedsparse.config import resolve

    rounds = args.train_rounds if label == "retrain" else args.rounds
    return resolve({
        "experiment": "lm-unlearn", "num-clients": args.clients, "lr": args.lr, "grad-clip": 1.0,
        "batch-size": args.batch_size, "seed": seed, "output-dir": str(out),
        "lm": {"block-size": args.block_size, "layers": args.layers, "heads": args.heads, "embd": args.embd,
               "local-steps": args.local_steps, "eval-windows": args.eval_windows, "sample-chars": 0},
        "lmu": {**METHODS[label], "forget": forget, "count": args.count, "length": args.length,
                "prefix": args.prefix, "repeats": args.repeats, "train-rounds": args.train_rounds, "rounds": rounds,
                "ascent-steps": args.ascent_steps, "ascent-lr": args.ascent_lr},
    })


def first_round(trace: list[dict], threshold: float = 0.5) -> int | None:
    """The first unlearning round (>= 1) whose forget quality reaches `threshold`; None if none does."""
    return next((t["round"] for t in trace if t["round"] >= 1 and t["quality/forget"] >= threshold), None)


def table(runs: list[dict]) -> str:
    """The markdown table: one row per (set, method), means over seeds."""
    lines = [("| set | method | seeds | rounds | quality before -> after | AUC before -> after | extracted before -> after | forget / twin loss "
             "after | val ppl before -> after | first round quality >= 0.5 (val ppl) | MB |"),
             "|---|---|---:|---:|---|---|---|---|---|---|---:|"]
    for forget in FORGET_SETS:
        for label in METHODS:
            mine = [r for r in runs if r["forget"] == forget and r["label"] == label]
            if not mine:
                continue
            first, last = [r["trace"][0] for r in mine], [r["trace"][-1] for r in mine]

            def mean(rows: list[dict], key: str) -> float:
                return float(np.mean([row[key] for row in rows]))

            hits = [first_round(r["trace"]) for r in mine]
            reached = [(h, r["trace"][h]["ppl/val"]) for h, r in zip(hits, mine, strict=True) if h is not None]
            missed = len(hits) - len(reached)
            reach = "; ".join([", ".join(f"{h} ({p:.2f})" for h, p in reached)] * bool(reached) + [
                f"not within {mine[0]['trace'][-1]['round']} in {missed} seed(s)"] * bool(missed))
            lines.append(
                f"| {forget} | {label} | {len(mine)} | {mine[0]['trace'][-1]['round']} | "
                f"{mean(first, 'quality/forget'):.3f} -> {mean(last, 'quality/forget'):.3f} | "
                f"{mean(first, 'auc/forget'):.2f} -> {mean(last, 'auc/forget'):.2f} | "
                f"{mean(first, 'extract/forget'):.2f} -> {mean(last, 'extract/forget'):.2f} | "
                f"{mean(last, 'loss/forget'):.2f} / {mean(last, 'loss/twins'):.2f} | "
                f"{mean(first, 'ppl/val'):.2f} -> {mean(last, 'ppl/val'):.2f} | {reach} | "
                f"{mean(last, 'bytes') / 1e6:.2f} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Forget quality and validation perplexity per unlearning round (mean over seeds), ID vs OOD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    for column, forget in enumerate(FORGET_SETS):
        for label in METHODS:
            mine = [r["trace"] for r in runs if r["forget"] == forget and r["label"] == label]
            if not mine:
                continue
            length = min(len(t) for t in mine)
            rounds = [mine[0][i]["round"] for i in range(length)]
            quality = [np.mean([t[i]["quality/forget"] for t in mine]) for i in range(length)]
            perplexity = [np.mean([t[i]["ppl/val"] for t in mine]) for i in range(length)]
            axes[0, column].plot(rounds, quality, marker="o", label=label)
            axes[1, column].plot(rounds, perplexity, marker="o", label=label)
        axes[0, column].set_title(f"{forget.upper()} forget set: forget quality", fontsize=10)
        axes[1, column].set_title(f"{forget.upper()} forget set: validation perplexity", fontsize=10)
        axes[1, column].set_xlabel("unlearning round (0 = trained model)")
        axes[1, column].set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    """Run the grid of (forget set, method, seed) and write the results (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_lm_unlearn_fed"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sets", nargs="+", default=list(FORGET_SETS), choices=list(FORGET_SETS))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--train-rounds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=48)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embd", type=int, default=64)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--ascent-steps", type=int, default=5)
    parser.add_argument("--ascent-lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from-results", action="store_true",
                        help="only rewrite table.md and trace.png from --out/results.json")
    args = parser.parse_args()
    if args.from_results:
        saved = json.loads((args.out / "results.json").read_text())
        (args.out / "table.md").write_text(table(saved["runs"]) + "\n")
        plot(saved["runs"], args.out / "trace.png")
        return
    torch.set_num_threads(args.threads)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a running app
    from server.local_grid import LocalGrid
    from server.loop import run_federation

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: list[dict] = []
    for seed in args.seeds:
        for forget in args.sets:
            for label in args.methods:
                out = args.out / "runs" / f"{forget}-{label}-s{seed}"
                cfg = run_config(args, forget, label, seed, out)
                run_start = time.perf_counter()
                summary = run_federation(LocalGrid(cfg), cfg)
                trace = [{k: int(v) if k in ("round", "bytes") else float(v) for k, v in row.items()}
                         for row in _read_trace(out / "lmu_trace.csv")]
                runs.append({"forget": forget, "label": label, "seed": seed, "trace": trace,
                             "seconds": time.perf_counter() - run_start, "set": summary["lmu_set"],
                             "parameters": summary["parameters"]})
                print(f"{forget} {label} seed {seed}: {runs[-1]['seconds']:.0f} s, quality "
                      f"{trace[0]['quality/forget']:.3f} -> {trace[-1]['quality/forget']:.3f}, ppl "
                      f"{trace[0]['ppl/val']:.2f} -> {trace[-1]['ppl/val']:.2f}", flush=True)
                _write(args, runs, time.perf_counter() - started)


def _read_trace(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write(args: argparse.Namespace, runs: list[dict], seconds: float) -> None:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "seconds": seconds, "runs": runs},
                                                      indent=1, default=lambda v: None if not math.isfinite(v) else v))
    (args.out / "table.md").write_text(table(runs) + "\n")
    plot(runs, args.out / "trace.png")


if __name__ == "__main__":
    main()
