"""Transfer unlearning by data selection as federated rounds: target accuracy vs static fraction.

Every run is the `transfer` experiment (`server.experiments.transfer`, preset `transfer-unlearning`) driven by the
real runner (`server.loop.run_federation`) with the real ClientApp on in-process nodes (`server.local_grid`), so
Ray's start-up is not paid per run. Settings are the preset's (Fashion-MNIST, classes 0-4 source, 5-9 target, cnn,
5 iid clients, 6000 training images, 5 pretraining + 5 transfer rounds, pool of 2000 target-class images, k = 1);
`all_data` does not depend on the static fraction and runs once per seed.

Writes `transfer_federated.csv` (one row per run), `table.md` and `transfer_federated.png` under `--out` (default
results/bench_transfer_federated) and prints the table: final target test accuracy, % (mean +- sd over seeds).

    .venv/bin/python simulations/bench_transfer_federated.py --seeds 0 1 2 --fractions 0.25 0.5 0.75
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("data_selection", "static_only", "all_data")


def run_once(method: str, fraction: float, seed: int, workdir: Path) -> dict:
    """One transfer run in this process; its summary.json entries."""
    import tomllib

    from fedsparse.config import resolve
    from server.local_grid import LocalGrid
    from server.loop import run_federation

    preset = tomllib.loads((REPO / "simulations/presets/transfer-unlearning.toml").read_text())
    preset["transfer"] = {**preset["transfer"], "method": method, "static-fraction": fraction}
    cfg = resolve({**preset, "seed": seed, "output-dir": str(workdir)})
    return run_federation(LocalGrid(cfg), cfg)


def summarise(values: list[float]) -> str:
    """'mean +- sd' in percent (sd 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--out", type=Path, default=REPO / "results/bench_transfer_federated")
    args = parser.parse_args()

    import torch
    from flwr.supercore.task_identity import TaskIdentity

    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages built outside a Flower app
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for seed in args.seeds:
        for method in METHODS:
            for fraction in (args.fractions if method != "all_data" else [1.0]):
                started = time.perf_counter()
                summary = run_once(method, fraction, seed, args.out / "runs" / f"{method}-{fraction}-s{seed}")
                rows.append({"seed": seed, "method": method, "static_fraction": fraction,
                             "target_accuracy": summary["target_accuracy"],
                             "best_target_accuracy": summary["best_target_accuracy"],
                             "pretrained_source_accuracy": summary["pretrained_source_accuracy"],
                             "selected": summary["selection"].get("selected", 0),
                             "distinct": summary["selection"].get("distinct", 0),
                             "selection_bytes": summary["selection_bytes"]["down"] + summary["selection_bytes"]["up"],
                             "round_bytes": summary["bytes_down"] + summary["bytes_up"],
                             "seconds": round(time.perf_counter() - started, 1)})
                print(f"seed {seed} {method:15s} static {fraction:.2f}: target {rows[-1]['target_accuracy']:.4f} "
                      f"({rows[-1]['seconds']} s)", flush=True)
                with open(args.out / "transfer_federated.csv", "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)

    def cell(method: str, fraction: float) -> str:
        wanted = 1.0 if method == "all_data" else fraction
        values = [r["target_accuracy"] for r in rows if r["method"] == method and r["static_fraction"] == wanted]
        return summarise(values) if values else ""

    lines = ["| static fraction | " + " | ".join(METHODS) + " |", "|---:|" + "---:|" * len(METHODS)]
    lines += [f"| {fraction:.2f} | " + " | ".join(cell(m, fraction) for m in METHODS) + " |"
              for fraction in args.fractions]
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    for method in METHODS:
        means, sds = [], []
        for fraction in args.fractions:
            wanted = 1.0 if method == "all_data" else fraction
            values = [100 * r["target_accuracy"] for r in rows if r["method"] == method
                      and r["static_fraction"] == wanted]
            means.append(statistics.mean(values))
            sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        axes.errorbar(args.fractions, means, yerr=sds, marker="o", capsize=3, label=method)
    axes.set_xlabel("static fraction of each client's target data")
    axes.set_ylabel("target test accuracy (%)")
    axes.set_title(f"federated transfer unlearning, {len(args.seeds)} seeds")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out / "transfer_federated.png", dpi=120)


if __name__ == "__main__":
    main()
