"""Sparsity sweep: {ssfl, random, magnitude} x sparsity {0.5, 0.8, 0.9, 0.95} plus dense fedavg, 2 seeds, on the
`sweep-fmnist` preset. Each run is a `fedsparse run` in its own process (finished runs are skipped, so the sweep
can be resumed). Writes sweep.csv, sweep.md and sweep.png into the output folder.

    python simulations/sweep_sparsity.py --out results/sweep [--rounds 15] [--seeds 1 2]

Figures are taken after `--rounds` rounds; a finished run with more rounds counts up to that round (with
lr-decay 1 its first R rounds are exactly those of an R-round run).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

from fedsparse.results import read_rounds

STRATEGIES = ("ssfl", "random", "magnitude")
SPARSITIES = (0.5, 0.8, 0.9, 0.95)


def runs(seeds: list[int]) -> list[tuple[str, float, int]]:
    grid = [("fedavg", 0.0, s) for s in seeds]
    grid += [(st, sp, s) for sp in SPARSITIES for st in STRATEGIES for s in seeds]
    return grid


def run_one(out: Path, strategy: str, sparsity: float, seed: int, rounds: int, extra: list[str]) -> Path:
    folder = out / f"{strategy}-s{sparsity:g}-seed{seed}"
    if (folder / "summary.json").exists() and json.loads((folder / "summary.json").read_text())["rounds"] >= rounds:
        return folder
    cmd = [sys.executable, "-m", "fedsparse.cli", "run", "--preset", "sweep-fmnist", "--out", str(folder),
           "--set", f"strategy={strategy}", f"sparsity={sparsity}", f"seed={seed}", f"num-rounds={rounds}", *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return folder


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["sparsity"]), []).append(r)
    lines = [("| strategy | sparsity | final acc % (mean ± sd) | best acc % | total MB (down+up+one-off) | "
              "ratio vs dense (per round) | seeds |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for (st, sp), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        acc = [100 * r["final_accuracy"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| {st} | {sp:g} | {statistics.mean(acc):.2f} ± {sd:.2f} | "
                     f"{statistics.mean(100 * r['best_accuracy'] for r in rs):.2f} | "
                     f"{statistics.mean(r['total_mb'] for r in rs):.1f} | "
                     f"{statistics.mean(r['bytes_ratio_vs_dense'] for r in rs):.2f}x | {len(rs)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    dense = [100 * r["final_accuracy"] for r in rows if r["strategy"] == "fedavg"]
    for st in STRATEGIES:
        pts = sorted({r["sparsity"] for r in rows if r["strategy"] == st})
        means = [statistics.mean(100 * r["final_accuracy"] for r in rows if r["strategy"] == st and r["sparsity"] == p)
                 for p in pts]
        mbs = [statistics.mean(r["total_mb"] for r in rows if r["strategy"] == st and r["sparsity"] == p) for p in pts]
        ax1.plot(pts, means, marker="o", label=st)
        ax2.plot(mbs, means, marker="o", label=st)
    if dense:
        ax1.axhline(statistics.mean(dense), color="k", ls="--", label="fedavg (dense)")
        mb = statistics.mean(r["total_mb"] for r in rows if r["strategy"] == "fedavg")
        ax2.plot([mb], [statistics.mean(dense)], "k*", ms=12, label="fedavg (dense)")
    ax1.set_xlabel("sparsity")
    ax2.set_xlabel("total MB on the wire")
    ax2.set_xscale("log")
    ax2.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    for ax in (ax1, ax2):
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fashion-MNIST, cnn, Dirichlet 0.3, 20 clients (10 per round)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for strategy, sparsity, seed in runs(args.seeds):
        folder = run_one(out, strategy, sparsity, seed, args.rounds, args.set)
        s = json.loads((folder / "summary.json").read_text())
        r = read_rounds(folder / "rounds.csv")[: args.rounds]
        rows.append({"strategy": strategy, "sparsity": sparsity, "seed": seed, "rounds": len(r),
                     "final_accuracy": r[-1]["test_accuracy"], "best_accuracy": max(x["test_accuracy"] for x in r),
                     "bytes_ratio_vs_dense": s["bytes_ratio_vs_dense"],
                     "total_mb": (sum(x["bytes_down"] + x["bytes_up"] for x in r) + s["bytes_oneoff"]) / 1e6,
                     "seconds": sum(x["seconds"] for x in r)})
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = table(rows)
    (out / "sweep.md").write_text(md + "\n")
    plot(rows, out / "sweep.png")
    print(md)
    print(f"\nwritten: {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.png'}")


if __name__ == "__main__":
    main()
