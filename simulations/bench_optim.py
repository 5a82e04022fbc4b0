"""SGD with momentum, Adam, TAM and AdaTAM side by side: centralised on a Fashion-MNIST subset, and optionally
through `fedsparse run` on a small federated task.

    python simulations/bench_optim.py [--runs sgd,adam,tam,adatam] [--epochs 3] [--train-size 10000] [--fl]

Centralised: the `cnn` trained on the first `--train-size` training images (one seeded shuffle per epoch, batch 32),
the test accuracy on the first `--test-size` test images every `--eval-every` steps; the optimiser is built by
`fedsparse.optim.build_optimizer`, as local training builds it. With `--fl`, each setting also runs as
`fedsparse run` (FedAvg, Fashion-MNIST subset, 10 clients, Dirichlet 0.3, `--rounds` rounds, 1 local epoch, the
optimiser rebuilt by every client every round, as train_local does).

Settings (`SETTINGS`): SGD and TAM at the project's lr 0.05 and momentum 0.9; Adam and AdaTAM at lr 1e-3, betas
(0.9, 0.999); TAM's decay_rate 0.9 and eps 1e-8 are the defaults of merging.md B.2. The paper's own hyper-parameters
and its lr-transfer rule were not found (merging.md B.2, H); `tam-2x` tries the UNVERIFIED guess that TAM, damping
uncorrelated gradients by about 1/2, wants twice SGD's lr; `adatam-bc` is AdaTAM with Adam's bias correction and
`adatam-lr1e-4` AdaTAM at a tenth of the lr: its momentum is a sum, not an average, so at equal lr its steps are
about d / (1 - beta1) = 5 times Adam's, and larger still in the first steps without bias correction.

Writes `curves.csv`, `fl_rounds.csv` (with --fl), `summary.csv` and `curves.png` under `--out`
(default results/bench_optim), and prints the summary table.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsparse.data import load_dataset
from fedsparse.models import build_model
from fedsparse.optim import build_optimizer
from fedsparse.results import read_rounds
from fedsparse.train import evaluate

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Setting:
    """One optimiser configuration: a registry name and the run-config knobs it gets."""

    optimizer: str
    lr: float
    momentum: float = 0.9
    extra: dict[str, Any] = field(default_factory=dict)


SETTINGS: dict[str, Setting] = {
    "sgd": Setting("sgd", 0.05),
    "adam": Setting("adam", 1e-3),
    "tam": Setting("tam", 0.05),
    "adatam": Setting("adatam", 1e-3),
    "tam-2x": Setting("tam", 0.1),
    "adatam-bc": Setting("adatam", 1e-3, extra={"bias_correction": True}),
    "adatam-lr1e-4": Setting("adatam", 1e-4),
}
CURVE_COLUMNS = ["setting", "step", "epoch", "test_accuracy", "test_loss", "train_loss", "mean_damping", "seconds"]


def mean_damping(optimizer: torch.optim.Optimizer) -> float:
    """Mean of the per-tensor damping d of a TAM-family optimiser (NaN for the others)."""
    values = [float(state["damping"]) for state in optimizer.state.values() if "damping" in state]
    return float(np.mean(values)) if values else float("nan")


def train_centralised(name: str, setting: Setting, args: argparse.Namespace, data: tuple[np.ndarray, ...]
                      ) -> list[dict]:
    """Train one setting; one curve row every `args.eval_every` steps and at the end of every epoch."""
    x_train, y_train, x_test, y_test = data
    model = build_model("cnn", x_train.shape[1:], 10, seed=args.seed)
    optimizer = build_optimizer(setting.optimizer, model.parameters(), lr=setting.lr, momentum=setting.momentum,
                                weight_decay=0.0, **setting.extra)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = -(-len(xt) // args.batch_size)
    rows, loss_sum, loss_count, step, start = [], 0.0, 0, 0, time.perf_counter()

    def record() -> None:
        nonlocal loss_sum, loss_count
        test_loss, test_accuracy = evaluate(model, x_test, y_test)
        rows.append({"setting": name, "step": step, "epoch": step / steps_per_epoch, "test_accuracy": test_accuracy,
                     "test_loss": test_loss, "train_loss": loss_sum / max(loss_count, 1),
                     "mean_damping": mean_damping(optimizer), "seconds": time.perf_counter() - start})
        loss_sum, loss_count = 0.0, 0
        model.train()

    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(xt), generator=generator)
        for first in range(0, len(xt), args.batch_size):
            batch = order[first:first + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(xt[batch]), yt[batch])
            loss.backward()
            optimizer.step()
            loss_sum, loss_count, step = loss_sum + loss.item(), loss_count + 1, step + 1
            if step % args.eval_every == 0 and step % steps_per_epoch != 0:
                record()
        record()
    return rows


def run_federated(name: str, setting: Setting, args: argparse.Namespace) -> list[dict]:
    """One `fedsparse run` (a subprocess, as a user runs it); its rounds.csv rows tagged with the setting."""
    if setting.extra:
        print(f"  {name}: skipped in FL (its extra options {setting.extra} have no run-config key)")
        return []
    out = Path(args.out) / "fl" / name
    overrides = {"strategy": "fedavg", "dataset": "fashion-mnist", "train-subset": args.train_size,
                 "num-clients": 10, "num-rounds": args.rounds, "partitioner": "dirichlet", "dirichlet-alpha": 0.3,
                 "local-epochs": 1, "batch-size": args.batch_size, "optimizer": setting.optimizer, "lr": setting.lr,
                 "momentum": setting.momentum, "seed": args.seed, "device": "cpu"}
    command = [sys.executable, "-m", "fedsparse.cli", "run", "--out", str(out), "--set",
               *[f"{key}={value}" for key, value in overrides.items()]]
    if args.ray_cpus:
        command[4:4] = ["--ray-cpus", str(args.ray_cpus)]
    subprocess.run(command, cwd=REPO, check=True)
    return [{"setting": name, **row} for row in read_rounds(out / "rounds.csv")]


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, curves: list[dict], fl_rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if fl_rows else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for name in dict.fromkeys(row["setting"] for row in curves):
        rows = [row for row in curves if row["setting"] == name]
        axes[0].plot([r["epoch"] for r in rows], [100 * r["test_accuracy"] for r in rows], marker=".", label=name)
        if not np.isnan(rows[-1]["mean_damping"]):
            axes[1].plot([r["epoch"] for r in rows], [r["mean_damping"] for r in rows], marker=".", label=name)
    axes[0].set(title="centralised: test accuracy", xlabel="epoch", ylabel="accuracy %")
    axes[1].set(title="TAM family: mean damping d", xlabel="epoch", ylabel="d", ylim=(0, 1.05))
    if fl_rows:
        for name in dict.fromkeys(row["setting"] for row in fl_rows):
            rows = [row for row in fl_rows if row["setting"] == name]
            axes[2].plot([r["round"] for r in rows], [100 * r["test_accuracy"] for r in rows], marker=".", label=name)
        axes[2].set(title="federated (fedsparse run): test accuracy", xlabel="round", ylabel="accuracy %")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(curves: list[dict], fl_rows: list[dict]) -> list[dict]:
    """Per setting: final and best centralised accuracy, last mean damping, seconds; final/best FL accuracy."""
    summary = []
    for name in dict.fromkeys(row["setting"] for row in curves):
        rows = [row for row in curves if row["setting"] == name]
        fl = [row for row in fl_rows if row["setting"] == name]
        setting = SETTINGS[name]
        summary.append({
            "setting": name, "optimizer": setting.optimizer, "lr": setting.lr,
            "final_acc": 100 * rows[-1]["test_accuracy"], "best_acc": 100 * max(r["test_accuracy"] for r in rows),
            "final_damping": rows[-1]["mean_damping"], "seconds": rows[-1]["seconds"],
            "fl_final_acc": 100 * fl[-1]["test_accuracy"] if fl else float("nan"),
            "fl_best_acc": 100 * max(r["test_accuracy"] for r in fl) if fl else float("nan"),
        })
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="sgd,adam,tam,adatam", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fl", action="store_true", help="also run every setting through `fedsparse run`")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds with --fl")
    parser.add_argument("--ray-cpus", type=int, default=None)
    parser.add_argument("--out", default="results/bench_optim")
    args = parser.parse_args()
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dataset = load_dataset("fashion-mnist")
    data = (dataset.x_train[:args.train_size], dataset.y_train[:args.train_size],
            dataset.x_test[:args.test_size], dataset.y_test[:args.test_size])
    curves, fl_rows = [], []
    for name in names:
        curves += train_centralised(name, SETTINGS[name], args, data)
        last = curves[-1]
        print(f"centralised {name}: test acc {100 * last['test_accuracy']:.2f}% after {args.epochs} epochs, "
              f"{last['seconds']:.0f} s", flush=True)
        write_csv(out / "curves.csv", curves, CURVE_COLUMNS)
    if args.fl:
        for name in names:
            fl_rows += run_federated(name, SETTINGS[name], args)
        write_csv(out / "fl_rounds.csv", fl_rows, ["setting", "round", "test_accuracy", "test_loss", "train_loss"])
    summary = summarise(curves, fl_rows)
    write_csv(out / "summary.csv", summary, list(summary[0]))
    plot(out / "curves.png", curves, fl_rows)

    print(f"\nFashion-MNIST, first {args.train_size} training images, cnn, batch {args.batch_size}, {args.epochs} "
          f"epochs, seed {args.seed}; test on the first {args.test_size} test images"
          + (f"; FL: 10 clients, Dirichlet 0.3, {args.rounds} rounds" if args.fl else ""))
    print("| setting | optimizer | lr | final acc % | best acc % | final mean d | seconds | FL final % | FL best % |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in summary:
        print(f"| {row['setting']} | {row['optimizer']} | {row['lr']:g} | {row['final_acc']:.2f} | "
              f"{row['best_acc']:.2f} | {row['final_damping']:.3f} | {row['seconds']:.0f} | "
              f"{row['fl_final_acc']:.2f} | {row['fl_best_acc']:.2f} |")
    print(f"\nwrote {out / 'curves.csv'}, {out / 'summary.csv'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
