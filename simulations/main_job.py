"""The README's main job: SSFL at 90% sparsity and dense FedAvg side by side on Fashion-MNIST (Dirichlet 0.3,
20 clients, 10 per round, the `main` preset), then the comparison table and plot.

    python simulations/main_job.py [--out results/main] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fedsparse.results import report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/main")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for both runs")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    folders = []
    for strategy in ("ssfl", "fedavg"):
        folder = out / strategy
        cmd = [sys.executable, "-m", "fedsparse.cli", "run", "--preset", "main", "--out", str(folder),
               "--set", f"strategy={strategy}", *args.set]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            print(f"main job: the {strategy} run failed", file=sys.stderr)
            return 1
        folders.append(folder)
    table = report(folders, out / "comparison.png")
    (out / "comparison.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\ntable: {out / 'comparison.md'}\nplot:  {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
