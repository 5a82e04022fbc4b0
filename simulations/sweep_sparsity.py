"""Sparsity sweep: {ssfl, random, magnitude} x sparsity {0.5, 0.8, 0.9, 0.95} plus dense fedavg, several seeds.
Writes sweep.csv (one row per run), sweep.md (per cell: mean, 95% t-interval, n seeds) and sweep.png (final
accuracy against sparsity and against total MB, with 95% error bars) into the output folder.

    python simulations/sweep_sparsity.py --out results/sweep [--rounds 15] [--seeds 1 2]
    python simulations/sweep_sparsity.py --in-process --preset sweep-fmnist-long --out results/sweep_long \\
        --seeds 1 2 3 4 5 --cells fedavg ssfl:0.9 magnitude:0.9 random:0.9 ssfl:0.9:int8

An ablation is a sweep with `--set` overrides into its own folder; `--baseline OTHER` adds the paired differences
of each of its cells against the same cell and dense fedavg in OTHER (same seeds):

    python simulations/sweep_sparsity.py --in-process --preset sweep-fmnist-long --out results/ablation/lr-0.1 \\
        --rounds 50 --seeds 1 2 3 --cells fedavg ssfl:0.9 --set lr=0.1 --baseline results/sweep_long

A cell is `strategy[:sparsity[:value-dtype]]` (fedavg has no sparsity; the dtype defaults to float32). Without
`--cells` every cell of the grid runs. By default each run is a `fedsparse run` in its own process (Flower's Ray
simulation); `--in-process` runs the real runner (`server.loop.run_federation`) with the real ClientApp in this
process (`server.local_grid.LocalGrid`): the same rounds without Ray's start-up, one after another. Runs are
seed-major (every cell of seed 1, then of seed 2, ...), so a sweep stopped early has all cells on its first seeds.
A finished run (summary.json with at least `--rounds` rounds) is skipped, so a sweep can be resumed; `--report-only`
runs nothing and writes the files from the run folders present. Figures are taken at round `--rounds`: a finished
run with more rounds counts up to that round (with lr-decay 1 its first R rounds are exactly those of an R-round
run), when that round was evaluated.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ("ssfl", "random", "magnitude")
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
DEFAULT_DTYPE = "float32"


@dataclass(frozen=True, order=True)
class Cell:
    """One configuration of the sweep: a strategy at a sparsity (0 for dense fedavg) with its values' dtype."""

    strategy: str
    sparsity: float = 0.0
    value_dtype: str = DEFAULT_DTYPE

    @classmethod
    def parse(cls, text: str) -> Cell:
        """`"fedavg"`, `"ssfl:0.9"` or `"ssfl:0.9:int8"` -> a Cell; ValueError naming the text otherwise."""
        parts = text.split(":")
        if not 1 <= len(parts) <= 3 or not parts[0]:
            raise ValueError(f"--cells: {text!r} is not strategy[:sparsity[:value-dtype]]")
        try:
            sparsity = float(parts[1]) if len(parts) > 1 else 0.0
        except ValueError as err:
            raise ValueError(f"--cells: {text!r}: sparsity {parts[1]!r} is not a number") from err
        if parts[0] == "fedavg" and (sparsity != 0.0 or len(parts) > 2):
            raise ValueError(f"--cells: {text!r}: fedavg is dense float32, it takes no sparsity or dtype")
        if parts[0] != "fedavg" and not 0.0 < sparsity < 1.0:
            raise ValueError(f"--cells: {text!r}: a sparse strategy needs a sparsity in (0, 1)")
        return cls(parts[0], sparsity, parts[2] if len(parts) > 2 else DEFAULT_DTYPE)

    @property
    def label(self) -> str:
        """The cell's name in tables and plots: "fedavg", "ssfl 0.9", "ssfl 0.9 int8"."""
        if self.strategy == "fedavg":
            return "fedavg"
        suffix = "" if self.value_dtype == DEFAULT_DTYPE else f" {self.value_dtype}"
        return f"{self.strategy} {self.sparsity:g}{suffix}"

    def folder(self, seed: int) -> str:
        """The run folder's name of this cell for `seed`."""
        dtype = "" if self.value_dtype == DEFAULT_DTYPE else f"-{self.value_dtype}"
        return f"{self.strategy}-s{self.sparsity:g}{dtype}-seed{seed}"

    def assignments(self) -> list[str]:
        """The `--set` pairs of this cell (none of the sparse keys for fedavg: it would refuse them)."""
        pairs = [f"strategy={self.strategy}"]
        if self.strategy != "fedavg":
            pairs += [f"sparse.sparsity={self.sparsity}", f"sparse.value-dtype={self.value_dtype}"]
        return pairs


def grid_cells() -> list[Cell]:
    """Every cell of the full sweep: fedavg, then each sparse strategy at each sparsity (float32)."""
    return [Cell("fedavg")] + [Cell(st, sp) for sp in SPARSITIES for st in STRATEGIES]


@dataclass
class RunResult:
    """One finished run's figures at round `rounds` (accuracies are fractions; MB are 10**6 bytes)."""

    strategy: str
    sparsity: float
    value_dtype: str
    seed: int
    rounds: int
    final_accuracy: float
    best_accuracy: float
    mb_per_round: float  # mean serialized bytes per round, down + up
    total_mb: float  # the rounds' bytes plus the one-off bytes
    bytes_ratio_vs_dense: float
    seconds: float  # the rounds' wall time

    @property
    def cell(self) -> Cell:
        """The cell this run belongs to."""
        return Cell(self.strategy, self.sparsity, self.value_dtype)


def is_finished(folder: Path, rounds: int) -> bool:
    """Whether `folder` holds a finished run of at least `rounds` rounds."""
    summary = folder / "summary.json"
    return summary.exists() and json.loads(summary.read_text())["rounds"] >= rounds


def run_subprocess(folder: Path, cell: Cell, seed: int, rounds: int, preset: str, extra: list[str]) -> None:
    """One run as `fedsparse run` in its own process (Ray simulation)."""
    cmd = [sys.executable, "-m", "fedsparse.cli", "run", "--preset", preset, "--out", str(folder),
           "--set", *cell.assignments(), f"seed={seed}", f"num-rounds={rounds}", *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_in_process(folder: Path, cell: Cell, seed: int, rounds: int, preset: str, extra: list[str]) -> None:
    """One run with the real runner and ClientApp in this process (`LocalGrid`), from scratch."""
    from fedsparse.cli import build_config
    from server.local_grid import LocalGrid
    from server.loop import run_federation

    cfg = build_config(preset, [*cell.assignments(), f"seed={seed}", f"num-rounds={rounds}", *extra], str(folder),
                       None)
    run_federation(LocalGrid(cfg), cfg)


def read_result(folder: Path, cell: Cell, seed: int, rounds: int) -> RunResult:
    """A finished run's figures taken at round `rounds` (which must have been evaluated)."""
    from fedsparse.results import read_rounds

    summary = json.loads((folder / "summary.json").read_text())
    rows = read_rounds(folder / "rounds.csv")[:rounds]
    final = float(rows[-1]["test_accuracy"])
    if not math.isfinite(final):
        raise ValueError(f"{folder}: round {len(rows)} was not evaluated; choose a --rounds the run evaluated")
    round_bytes = sum(float(r["bytes_down"]) + float(r["bytes_up"]) for r in rows)
    return RunResult(strategy=cell.strategy, sparsity=cell.sparsity, value_dtype=cell.value_dtype, seed=seed,
                     rounds=len(rows), final_accuracy=final,
                     best_accuracy=max(float(r["test_accuracy"]) for r in rows
                                       if math.isfinite(float(r["test_accuracy"]))),
                     mb_per_round=round_bytes / len(rows) / 1e6,
                     total_mb=(round_bytes + summary["bytes_oneoff"]) / 1e6,
                     bytes_ratio_vs_dense=summary["bytes_ratio_vs_dense"],
                     seconds=sum(float(r["seconds"]) for r in rows))


@dataclass(frozen=True)
class Interval:
    """Mean and the half-width of its two-sided 95% Student-t confidence interval (0 for one value)."""

    mean: float
    half_width: float
    n: int


def t_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """Mean of `values` +- t_{(1+confidence)/2, n-1} * sd / sqrt(n) (sd with ddof 1); half-width 0 when n = 1."""
    if not values:
        raise ValueError("t_interval needs at least one value")
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, 0.0, 1)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, half, n)


def by_cell(results: list[RunResult]) -> dict[Cell, list[RunResult]]:
    """The runs grouped by cell, cells in (sparsity, strategy, dtype) order."""
    groups: dict[Cell, list[RunResult]] = {}
    for result in results:
        groups.setdefault(result.cell, []).append(result)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].sparsity, kv[0].strategy, kv[0].value_dtype)))


def table(results: list[RunResult]) -> str:
    """Markdown: per cell the final and best accuracy (mean, 95% interval), bytes, wall time and seeds."""
    lines = [("| cell | final acc % (mean ± 95% CI) | best acc % (mean ± 95% CI) | MB per round | total MB "
              "(incl. one-off) | x fewer bytes per round vs dense | s per run | seeds |"),
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for cell, runs in by_cell(results).items():
        final = t_interval([100 * r.final_accuracy for r in runs])
        best = t_interval([100 * r.best_accuracy for r in runs])
        seeds = ",".join(str(r.seed) for r in sorted(runs, key=lambda r: r.seed))
        lines.append(f"| {cell.label} | {final.mean:.2f} ± {final.half_width:.2f} | "
                     f"{best.mean:.2f} ± {best.half_width:.2f} | "
                     f"{statistics.fmean(r.mb_per_round for r in runs):.3f} | "
                     f"{statistics.fmean(r.total_mb for r in runs):.1f} | "
                     f"{statistics.fmean(r.bytes_ratio_vs_dense for r in runs):.2f}x | "
                     f"{statistics.fmean(r.seconds for r in runs):.0f} | {len(runs)} ({seeds}) |")
    return "\n".join(lines)


def comparisons(cells: list[Cell]) -> list[tuple[Cell, Cell]]:
    """The (cell, reference) pairs worth a paired difference: every sparse float32 cell against dense fedavg,
    SSFL against each other strategy at the same sparsity, and every non-float32 cell against its float32 twin."""
    present = set(cells)
    pairs = []
    for cell in cells:
        float32_twin = Cell(cell.strategy, cell.sparsity)
        if cell.value_dtype != DEFAULT_DTYPE:
            if float32_twin in present:
                pairs.append((cell, float32_twin))
        elif cell.strategy != "fedavg" and Cell("fedavg") in present:
            pairs.append((cell, Cell("fedavg")))
    for cell in cells:
        if cell.strategy == "ssfl" and cell.value_dtype == DEFAULT_DTYPE:
            pairs += [(cell, other) for other in cells if other.strategy not in ("ssfl", "fedavg")
                      and other.sparsity == cell.sparsity and other.value_dtype == DEFAULT_DTYPE]
    return pairs


def paired_row(label: str, mine: dict[int, float], theirs: dict[int, float]) -> str | None:
    """One markdown row: the final-accuracy differences (points) `mine - theirs` over the seeds both have (each a
    {seed: final accuracy} map), mean and 95% t-interval; None when they share no seed."""
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    diffs = [100 * (mine[s] - theirs[s]) for s in seeds]
    got = t_interval(diffs)
    return (f"| {label} | {got.mean:+.2f} ± {got.half_width:.2f} | {', '.join(f'{d:+.2f}' for d in diffs)} | "
            f"{len(seeds)} ({','.join(map(str, seeds))}) |")


PAIRED_HEADER = ["| difference (same seeds) | final acc, points (mean ± 95% CI) | per seed | seeds |", "|---|---:|---|---|"]


def paired_table(results: list[RunResult]) -> str:
    """Markdown: final-accuracy differences (points) between two cells run with the same seeds (same data split,
    client sampling and initialisation), mean and 95% t-interval over the seeds both have."""
    groups = by_cell(results)
    rows = [paired_row(f"{cell.label} − {reference.label}", {r.seed: r.final_accuracy for r in groups[cell]},
                       {r.seed: r.final_accuracy for r in groups[reference]})
            for cell, reference in comparisons(list(groups))]
    rows = [row for row in rows if row]
    return "\n".join(PAIRED_HEADER + rows) if rows else ""


def baseline_table(results: list[RunResult], baseline: list[RunResult], name: str, baseline_name: str) -> str:
    """Markdown: every cell of this sweep against the same cell, and against dense fedavg, of a `baseline` sweep
    (another output folder, e.g. the same cells without this sweep's `--set`), paired by seed as in
    `paired_table`; `name` and `baseline_name` label the two sweeps' cells ("ssfl 0.9 [lr-0.1] − ...")."""
    mine, theirs = by_cell(results), by_cell(baseline)
    rows = []
    for cell, runs in mine.items():
        finals = {r.seed: r.final_accuracy for r in runs}
        for reference in dict.fromkeys((cell, Cell("fedavg"))):  # fedavg against fedavg once
            if reference in theirs:
                rows.append(paired_row(f"{cell.label} [{name}] − {reference.label} [{baseline_name}]", finals,
                                       {r.seed: r.final_accuracy for r in theirs[reference]}))
    rows = [row for row in rows if row]
    return "\n".join(PAIRED_HEADER + rows) if rows else ""


SERIES_COLORS = {("fedavg", DEFAULT_DTYPE): "black", ("ssfl", DEFAULT_DTYPE): "tab:blue",
                 ("magnitude", DEFAULT_DTYPE): "tab:orange", ("random", DEFAULT_DTYPE): "tab:green",
                 ("ssfl", "int8"): "tab:purple", ("ssfl", "float16"): "tab:cyan"}


def series_color(strategy: str, value_dtype: str) -> str | None:
    """The same colour for a strategy and dtype in every panel (None: matplotlib's next colour)."""
    return SERIES_COLORS.get((strategy, value_dtype))


def curves(out: Path, results: list[RunResult]) -> dict[Cell, dict[int, list[float]]]:
    """Per cell: {evaluated round (up to the runs' `rounds`): the seeds' test accuracies in %}."""
    from fedsparse.results import read_rounds

    found: dict[Cell, dict[int, list[float]]] = {}
    for result in results:
        for row in read_rounds(out / result.cell.folder(result.seed) / "rounds.csv")[: result.rounds]:
            if math.isfinite(float(row["test_accuracy"])):
                found.setdefault(result.cell, {}).setdefault(int(row["round"]), []).append(
                    100 * float(row["test_accuracy"]))
    return found


def plot(results: list[RunResult], path: Path, title: str, out: Path | None = None) -> None:
    """Final accuracy (mean, 95% t-interval error bars) against sparsity and against total MB, one line per
    strategy and dtype; dense fedavg as a band (its interval) and a star. With `out` (the run folders), a third
    panel: accuracy at every evaluated round, mean and 95% interval per cell."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_cell(results)
    fig, axes = plt.subplots(1, 3 if out is not None else 2, figsize=(16.5 if out is not None else 11, 4.2))
    ax1, ax2 = axes[0], axes[1]
    if out is not None:
        for cell, per_round in curves(out, results).items():
            rounds = sorted(per_round)
            got = [t_interval(per_round[r]) for r in rounds]
            axes[2].errorbar(rounds, [g.mean for g in got], yerr=[g.half_width for g in got], marker=".",
                             capsize=2, label=f"{cell.label} (n={max(g.n for g in got)})",
                             color=series_color(cell.strategy, cell.value_dtype))
        axes[2].set_xlabel("round")
        axes[2].set_ylabel("test accuracy (%), mean ± 95% CI")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    series: dict[tuple[str, str], list[Cell]] = {}
    for cell in groups:
        if cell.strategy != "fedavg":
            series.setdefault((cell.strategy, cell.value_dtype), []).append(cell)
    for (strategy, dtype), cells in series.items():
        label = strategy if dtype == DEFAULT_DTYPE else f"{strategy} {dtype}"
        acc = [t_interval([100 * r.final_accuracy for r in groups[c]]) for c in cells]
        mbs = [statistics.fmean(r.total_mb for r in groups[c]) for c in cells]
        sparsities = [c.sparsity for c in cells]
        color = series_color(strategy, dtype)
        ax1.errorbar(sparsities, [a.mean for a in acc], yerr=[a.half_width for a in acc], marker="o",
                     capsize=3, label=label, color=color)
        ax2.errorbar(mbs, [a.mean for a in acc], yerr=[a.half_width for a in acc], marker="o", capsize=3,
                     label=label, color=color)
    dense = groups.get(Cell("fedavg"))
    if dense:
        acc = t_interval([100 * r.final_accuracy for r in dense])
        ax1.axhline(acc.mean, color="k", ls="--", label=f"fedavg (dense), n={acc.n}")
        ax1.axhspan(acc.mean - acc.half_width, acc.mean + acc.half_width, color="k", alpha=0.08)
        ax2.errorbar([statistics.fmean(r.total_mb for r in dense)], [acc.mean], yerr=[acc.half_width], fmt="k*",
                     ms=12, capsize=3, label="fedavg (dense)")
    ax1.set_xlabel("sparsity")
    ax2.set_xlabel("total MB on the wire (rounds + one-off)")
    ax2.set_xscale("log")
    ax2.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in (ax1, ax2):
        ax.set_ylabel("final test accuracy (%), mean ± 95% CI")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layer_densities(folder: Path) -> dict[str, float]:
    """Kept fraction of each maskable tensor in the mask of a finished masked run (from its checkpoint's strategy
    state); {} for a run without a mask (fedavg)."""
    import torch

    from fedsparse import sparse

    state = torch.load(folder / "checkpoint.pt", weights_only=False)["strategy"]
    if "mask-bits" not in state:
        return {}
    masks = sparse.unpack_mask(state["mask-bits"], state["layout"])
    return {name: float(mask.float().mean()) for name, mask in masks.items()}


def density_table(out: Path, results: list[RunResult]) -> str:
    """Markdown: per masked cell, the mean kept fraction of each maskable tensor over its seeds (where the global
    top-k put the kept weights)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for result in results:
        for name, density in layer_densities(out / result.cell.folder(result.seed)).items():
            rows.setdefault(result.cell.label, {}).setdefault(name, []).append(density)
    if not rows:
        return ""
    names = list(next(iter(rows.values())))
    lines = ["| cell | " + " | ".join(f"kept in {n}" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for label, per_layer in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{statistics.fmean(per_layer[n]):.4f}" for n in names) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, results: list[RunResult], title: str, baseline: list[RunResult] | None = None,
                  baseline_name: str = "baseline") -> str:
    """sweep.csv, sweep.md (the accuracy table, the paired differences, those against `baseline` when given, then
    the masks' kept fraction per layer) and sweep.png in `out`; returns the markdown."""
    with (out / "sweep.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    md = table(results)
    paired = paired_table(results)
    if paired:
        md += "\n\nPaired differences of final accuracy:\n\n" + paired
    against = baseline_table(results, baseline, out.name, baseline_name) if baseline else ""
    if against:
        md += f"\n\nAgainst the baseline ({baseline_name}), paired by seed:\n\n" + against
    densities = density_table(out, results)
    if densities:
        md += "\n\nKept fraction of each masked tensor (mean over seeds):\n\n" + densities
    (out / "sweep.md").write_text(md + "\n")
    plot(results, out / "sweep.png", title, out)
    return md


def read_baseline(folder: Path, cells: list[Cell], seeds: list[int], rounds: int) -> list[RunResult]:
    """The finished runs in `folder` of `cells` and of dense fedavg, for `seeds`, taken at round `rounds`."""
    wanted = list(dict.fromkeys([*cells, Cell("fedavg")]))
    return [read_result(folder / cell.folder(seed), cell, seed, rounds) for seed in seeds for cell in wanted
            if is_finished(folder / cell.folder(seed), rounds)]


def main(argv: list[str] | None = None) -> None:
    """Run the sweep's missing runs, then write its files."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "sweep")
    parser.add_argument("--preset", default="sweep-fmnist", help="the base config (simulations/presets)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cells", nargs="+", type=Cell.parse, default=None,
                        help="strategy[:sparsity[:value-dtype]] cells to run (default: the whole grid)")
    parser.add_argument("--in-process", action="store_true", help="run in this process (LocalGrid), not on Ray")
    parser.add_argument("--report-only", action="store_true", help="run nothing; tables from the folders present")
    parser.add_argument("--title", default="Fashion-MNIST, cnn, Dirichlet 0.3, 20 clients (10 per round)")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another sweep's output folder: pair every cell with its same cell and fedavg there")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = args.cells or grid_cells()
    if args.in_process:
        import torch
        from flwr.supercore.task_identity import TaskIdentity

        torch.set_num_threads(1)
        logging.getLogger("fedsparse").setLevel(logging.WARNING)
        sys.path.insert(0, str(REPO))
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a running app
    runner = run_in_process if args.in_process else run_subprocess
    results = []
    for seed in args.seeds:
        for cell in cells:
            folder = out / cell.folder(seed)
            if not is_finished(folder, args.rounds):
                if args.report_only:
                    continue
                start = time.perf_counter()
                runner(folder, cell, seed, args.rounds, args.preset, args.set)
                print(f"[sweep] {cell.label} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
            results.append(read_result(folder, cell, seed, args.rounds))
            print(f"[sweep] {cell.label} seed {seed}: final {100 * results[-1].final_accuracy:.2f}%", flush=True)
    if not results:
        print("no finished runs", flush=True)
        return
    baseline = read_baseline(args.baseline.resolve(), cells, args.seeds, args.rounds) if args.baseline else None
    md = write_outputs(out, results, args.title, baseline, args.baseline.name if args.baseline else "baseline")
    print(md)
    print(f"\nwritten: {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.png'}", flush=True)


if __name__ == "__main__":
    main()
