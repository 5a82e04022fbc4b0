"""Results of a run: `config.json`, `rounds.csv`, `summary.json` and `curves.png` in the output folder, and
`report()` which compares several runs in one table and one plot.

A round the runner did not evaluate (`eval-every` > 1) has NaN test metrics in memory and empty cells in
rounds.csv; every reader here skips those rounds where it needs a measured accuracy (best accuracy, plots). The
last round of a run is always evaluated, so its final accuracy is a measured one.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

ROUND_COLUMNS = ["round", "test_loss", "test_accuracy", "train_loss", "bytes_down", "bytes_up",
                 "logical_down", "logical_up", "clients", "rejected", "seconds"]
PHASE_COLUMN = "phase"


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically (a temporary file, then a rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def round_columns(rows: list[dict]) -> list[str]:
    """The columns of rounds.csv: the core ones, then `phase`, then every evaluator metric ("acc/<task>", ...) in
    the order the rows first name them."""
    extra: list[str] = []
    for row in rows:
        extra += [k for k in row if "/" in k and k not in extra]
    return [*ROUND_COLUMNS, PHASE_COLUMN, *extra]


def csv_cell(value: Any) -> Any:
    """A rounds.csv cell: a missing or NaN metric (a round that was not evaluated) is an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def write_rounds(path: Path, rows: list[dict]) -> None:
    """Write rounds.csv (atomically): one line per round; a metric a round did not measure (missing or NaN) is left
    empty, and reads back as NaN."""
    columns = round_columns(rows)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: csv_cell(row.get(k)) for k in columns})
    tmp.replace(path)


def read_rounds(path: Path, *, missing_ok: bool = False) -> list[dict[str, float | str]]:
    """The rows of a rounds.csv: the one reader of that file. Every column is a float (an empty cell: NaN) except
    `phase`, a string; a file written before phases existed has no `phase` column and reads the same otherwise.

    With `missing_ok`, a file that does not exist (yet: a run before its first round ends) reads as no rows.
    """
    try:
        with Path(path).open() as f:
            return [{k: v if k == PHASE_COLUMN else float(v) if v != "" else math.nan for k, v in row.items()}
                    for row in csv.DictReader(f)]
    except FileNotFoundError:
        if missing_ok:
            return []
        raise


def summarize(cfg: dict, rows: list[dict], extra: dict) -> dict:
    """summary.json's entries from the config and the rows (accuracy, loss, bytes, seconds), plus `extra`.
    `final_accuracy` is the last round's; `best_accuracy` the best over the evaluated rounds."""
    accs = [r["test_accuracy"] for r in rows if math.isfinite(r["test_accuracy"])]
    return {
        "strategy": cfg["strategy"], "dataset": cfg["dataset"], "model": cfg["model"],
        "rounds": len(rows),
        "final_accuracy": rows[-1]["test_accuracy"] if rows else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": rows[-1]["test_loss"] if rows else None,
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "logical_down": sum(r["logical_down"] for r in rows),
        "logical_up": sum(r["logical_up"] for r in rows),
        "seconds": sum(r["seconds"] for r in rows),
        **extra,
    }


def plot_runs(runs: dict[str, list[dict]], oneoff: dict[str, float], path: Path, title: str = "") -> None:
    """Accuracy against round and against cumulative megabytes (both directions, one-off costs included); rounds
    that were not evaluated are left out of the curves (their bytes still count)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in runs.items():
        total, rounds, acc, mb = oneoff.get(label, 0.0), [], [], []
        for r in rows:
            total += r["bytes_down"] + r["bytes_up"]
            if math.isfinite(r["test_accuracy"]):
                rounds.append(r["round"])
                acc.append(100 * r["test_accuracy"])
                mb.append(total / 1e6)
        ax1.plot(rounds, acc, marker=".", label=label)
        ax2.plot(mb, acc, marker=".", label=label)
    ax1.set_xlabel("round")
    ax2.set_xlabel("cumulative MB on the wire (down + up)")
    ax2.set_xscale("log")
    for axis in (ax2.xaxis.set_major_formatter, ax2.xaxis.set_minor_formatter):  # 30, 40, 100, not 3x10^1
        axis(matplotlib.ticker.FormatStrFormatter("%g"))
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_run(folder: Path) -> tuple[dict, list[dict]]:
    """(summary.json, rounds.csv rows) of a finished run folder."""
    summary = json.loads((folder / "summary.json").read_text())
    return summary, read_rounds(folder / "rounds.csv")


def run_label(summary: dict, folder: Path) -> str:
    """A run's name in plots and tables: strategy, density when below 1, value dtype when not float32, folder."""
    label = summary["strategy"]
    if summary.get("density", 1.0) < 1.0:
        label += f" d={summary['density']:.2f}"
    if summary.get("value_dtype", "float32") != "float32":
        label += f" {summary['value_dtype']}"
    return f"{label} ({folder.name})"


def comparison_table(folders: list[Path]) -> str:
    """A markdown table of several finished runs."""
    lines = [("| run | strategy | density | dtype | rounds | final acc | best acc | MB down | MB up | MB one-off "
              "| ratio vs dense |"),
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for folder in folders:
        s, _ = load_run(folder)
        lines.append(
            f"| {folder.name} | {s['strategy']} | {s.get('density', 1.0):.2f} | {s.get('value_dtype', 'float32')} "
            f"| {s['rounds']} | {100 * s['final_accuracy']:.2f} | {100 * s['best_accuracy']:.2f} "
            f"| {s['bytes_down'] / 1e6:.2f} | {s['bytes_up'] / 1e6:.2f} | {s.get('bytes_oneoff', 0) / 1e6:.2f} "
            f"| {s.get('bytes_ratio_vs_dense', 1.0):.1f}x |")
    return "\n".join(lines)


def report(folders: list[Path], plot_path: Path | None = None) -> str:
    """Print-ready comparison of runs; with `plot_path`, also one plot of all of them."""
    folders = [Path(f) for f in folders]
    missing = [str(f) for f in folders if not (f / "summary.json").exists()]
    if missing:
        raise FileNotFoundError(f"no summary.json in: {', '.join(missing)} (did the run finish?)")
    if plot_path is not None:
        runs, oneoff = {}, {}
        for folder in folders:
            s, rows = load_run(folder)
            label = run_label(s, folder)
            runs[label], oneoff[label] = rows, s.get("bytes_oneoff", 0)
        plot_runs(runs, oneoff, plot_path)
    return comparison_table(folders)
