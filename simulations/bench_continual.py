"""Centralised continual-learning demo: fine-tuning vs SFA vs L2 vs EWC vs replay on a Fashion-MNIST stream.

One learner holds all data (the SFA paper's setting), trained through the tasks by `fedsparse.continual.run_stream`
with a small `mlp`; each task is a subset of Fashion-MNIST (`--train-size` / `--test-size` examples).
- `--stream permuted` (default): 5 tasks, seeded pixel permutations (task 0 unpermuted), all 10 classes each
  (domain-incremental: the shared head sees the same labels in every task).
- `--stream split`: 5 tasks of 2 classes, labels kept on the shared 10-way head (class-incremental: the hardest
  setting for penalty and averaging methods; only replay keeps old classes alive there).

Writes, under `results/bench_continual/<stream>/`: `matrix_<method>.csv` and `matrix_<method>.png` (the accuracy
matrix R[i][j] and its heat map) and `summary.csv` (average accuracy, forgetting, backward transfer, seconds), and
prints the table. One seed. The defaults (SGD lr 0.05, momentum 0.9, 3 epochs; SFA beta 0.25, p 0.25; L2 0.1;
EWC 10) were picked from a handful of one-seed runs on the permuted stream's *test* accuracy, so they flatter every
method a little; no validation split, no proper tuning. EWC at strength 100 diverges with this learning rate
(lr * lambda * max Fisher > 2 makes the quadratic term unstable).

    .venv/bin/python simulations/bench_continual.py --stream permuted

Measured (seed 0, 2000 train / 1000 test images a task, about 40 s wall and 12 CPU-s a stream on a loaded machine),
ACC / FGT / BWT in points:
- permuted: finetune 44.8 / 35.2 / -35.2, sfa 60.7 / 8.4 / -8.4, l2 58.6 / 9.2 / -9.1, ewc 69.5 / 4.4 / -4.1,
  replay 72.9 / 1.7 / -1.1. SFA beats fine-tuning and L2 here but not EWC, and stays 12 points below replay.
- split: every method but replay ends near 20 (only the last task's 2 classes are predicted); replay 63.5.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from fedsparse.continual import (
    METHODS,
    SFAConfig,
    StreamConfig,
    permuted_stream,
    plot_matrix,
    run_stream,
    split_stream,
    summarize,
    write_matrix_csv,
)
from fedsparse.models import build_model
from fedsparse.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", choices=("permuted", "split"), default="permuted")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--train-size", type=int, default=2000, help="training examples per task")
    parser.add_argument("--test-size", type=int, default=1000, help="test examples per task")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--sfa-beta", type=float, default=0.25)
    parser.add_argument("--sfa-p", type=float, default=0.25)
    parser.add_argument("--l2-strength", type=float, default=0.1)
    parser.add_argument("--ewc-strength", type=float, default=10.0)
    parser.add_argument("--fisher-examples", type=int, default=500)
    parser.add_argument("--replay-capacity", type=int, default=500)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_continual")
    return parser.parse_args()


def main() -> None:
    """Run every method on the stream, write the matrices, heat maps and the summary, print the table."""
    args = parse_args()
    torch.set_num_threads(1)
    if args.stream == "permuted":
        tasks = permuted_stream("fashion-mnist", num_tasks=5, seed=args.seed, train_size=args.train_size,
                                test_size=args.test_size)
    else:
        tasks = split_stream("fashion-mnist", classes_per_task=2, train_size=args.train_size,
                             test_size=args.test_size)
    config = StreamConfig(
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum),
        seed=args.seed, sfa=SFAConfig(beta=args.sfa_beta, p=args.sfa_p), l2_strength=args.l2_strength,
        ewc_strength=args.ewc_strength, fisher_examples=args.fisher_examples, replay_capacity=args.replay_capacity)
    out = args.out / args.stream
    names = [task.name.split(":")[-1] for task in tasks]
    rows = []
    for method in args.methods:
        started = time.perf_counter()
        model = build_model(args.model, tasks[0].input_shape, 10, seed=args.seed)
        result = run_stream(model, tasks, method, config)
        seconds = time.perf_counter() - started
        summary = summarize(result.accuracy)
        write_matrix_csv(out / f"matrix_{method}.csv", result.accuracy, names)
        plot_matrix(out / f"matrix_{method}.png", result.accuracy, names, title=f"{args.stream}: {method}")
        rows.append({"stream": args.stream, "method": method, "seed": args.seed,
                     "average_accuracy": round(summary.average_accuracy, 4),
                     "average_forgetting": round(summary.average_forgetting, 4),
                     "backward_transfer": round(summary.backward_transfer, 4), "seconds": round(seconds, 1)})
        print(f"{method:9s} ACC {100 * summary.average_accuracy:5.1f}  FGT {100 * summary.average_forgetting:5.1f}"
              f"  BWT {100 * summary.backward_transfer:6.1f}  ({seconds:.0f} s)", flush=True)
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
