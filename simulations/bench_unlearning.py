"""Centralised unlearning benchmark: every method of `fedsparse.unlearning` on Fashion-MNIST with the `cnn`.

Setup (defaults; every number is a flag):
- Data: the first 10,000 Fashion-MNIST training images; 1,000 test images (a fixed random draw) for test accuracy
  and the MIA; retain accuracy on a fixed random 1,000 of the retain set (to keep evaluation cheap).
- Forget sets, 10% of the training subset: `uniform` (1,000 images drawn uniformly) and `class` (1,000 images drawn
  only from classes 2 and 5, pullover and sandal: half of their images, as DEL's non-IID split of CIFAR-10).
- The original model: the `cnn` trained on all 10,000 images (`--train-epochs`, SGD lr 0.05, momentum 0.9, batch 64).
- The oracle: N models retrained from scratch on the retain set with the same recipe, seeds 0..N-1.
- Every method runs N times from the one original model (seeds 0..N-1), each run on its own random draw of
  `--unlearn-retain` retain images (the unlearning budget: a fraction of retraining's cost) plus the forget set.
- Metrics, averaged over the N runs: forget / retain / test accuracy and their gaps to the retrained models, the
  loss-threshold MIA AUC (forget vs test; for `class`, vs the test images of classes 2 and 5), seconds per run, and
  the share of parameters changed; and the NeurIPS 2023 forgetting score from the N unlearned vs N retrained models
  (F, and F x retain ratio x test ratio). With N = 8 the score resolves eps only up to ln 7 = 1.95: its levels are
  1, 1/2, 1/4, 1/8 and 0 (see `fedsparse.unlearning.evaluate.epsilon_resolution`).

Writes `results.csv`, `table.md` and `scores.png` under `--out` (default results/bench_unlearning), rewritten after
every method, and prints the table. One torch thread. The two forget settings are independent: run them as two
processes (`--kinds uniform --out A`, `--kinds class --out B`) to use two cores.

    python simulations/bench_unlearning.py [--models 8] [--kinds uniform class] [--methods del finetune ...]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from fedsparse.data import load_dataset
from fedsparse.models import build_model
from fedsparse.unlearning import UNLEARNING_METHODS, ArrayData, UnlearnConfig, unlearn
from fedsparse.unlearning.evaluate import (
    epsilon_resolution,
    evaluate_model,
    forgetting_score,
    logit_scaled_confidence,
    predict_logits,
)

REPO = Path(__file__).resolve().parent.parent
FORGET_CLASSES = (2, 5)
ORIGINAL_SEED = 10_000

# Per-method settings on top of the shared ones (UnlearnConfig defaults otherwise); chosen by hand, not tuned.
METHOD_SETTINGS: dict[str, dict] = {
    "finetune": {"lr": 0.05},
    "gradient_ascent": {"lr": 0.005},
    "neggrad_plus": {"lr": 0.05, "neggrad_beta": 0.95},
    "l1_sparse": {"lr": 0.05, "l1_coefficient": 5e-4},
    "random_label": {"lr": 0.05},
    "salun": {"lr": 0.05, "salun_fraction": 0.5},
    "scrub": {"lr": 0.05, "scrub_max_epochs": 1},
    "del": {"lr": 0.05, "epochs": 2, "del_alpha": 0.3},
}


@dataclasses.dataclass(frozen=True)
class Split:
    """One forget setting: the sets a method sees and the sets it is evaluated on."""

    kind: str
    retain: ArrayData
    forget: ArrayData
    retain_eval: ArrayData
    test_eval: ArrayData
    mia_test: ArrayData


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "results" / "bench_unlearning"))
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--eval-size", type=int, default=1_000, help="test images and retain images evaluated")
    parser.add_argument("--forget-fraction", type=float, default=0.1)
    parser.add_argument("--kinds", nargs="+", default=["uniform", "class"], choices=["uniform", "class"])
    methods = ["del"] + [m for m in UNLEARNING_METHODS if m not in ("retrain", "del")]  # the method of interest first
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--models", type=int, default=8, help="N unlearned and N retrained models per setting")
    parser.add_argument("--train-epochs", type=int, default=2, help="epochs of the original and retrained models")
    parser.add_argument("--unlearn-retain", type=int, default=2_500, help="retain images per unlearning run")
    parser.add_argument("--unlearn-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="data draws")
    return parser.parse_args()


def load_data(args: argparse.Namespace) -> tuple[ArrayData, ArrayData]:
    """The training subset and the test draw."""
    dataset = load_dataset("fashion-mnist")
    train = ArrayData(dataset.x_train[:args.train_size].astype(np.float32),
                      dataset.y_train[:args.train_size].astype(np.int64))
    test_idx = np.random.default_rng(args.seed).choice(len(dataset.y_test), args.eval_size, replace=False)
    return train, ArrayData(dataset.x_test[test_idx].astype(np.float32), dataset.y_test[test_idx].astype(np.int64))


def make_split(kind: str, train: ArrayData, test: ArrayData, args: argparse.Namespace) -> Split:
    """Retain / forget sets of one kind, and the evaluation draws."""
    rng = np.random.default_rng(args.seed + 1)
    count = round(args.forget_fraction * len(train))
    if kind == "uniform":
        forget_idx = rng.choice(len(train), count, replace=False)
        mia_test = test
    else:
        pool = np.flatnonzero(np.isin(train.y, FORGET_CLASSES))
        if count > len(pool):
            raise ValueError(f"the class-skewed forget set needs {count} images of classes {FORGET_CLASSES}, "
                             f"the training subset has {len(pool)}")
        forget_idx = rng.choice(pool, count, replace=False)
        mia_test = test.subset(np.isin(test.y, FORGET_CLASSES))
    is_forget = np.zeros(len(train), dtype=bool)
    is_forget[forget_idx] = True
    retain = train.subset(~is_forget)
    retain_eval = retain.subset(rng.choice(len(retain), min(args.eval_size, len(retain)), replace=False))
    return Split(kind, retain, train.subset(is_forget), retain_eval, test, mia_test)


def training_config(args: argparse.Namespace, seed: int) -> UnlearnConfig:
    """The recipe of the original and the retrained models."""
    return UnlearnConfig(retrain_epochs=args.train_epochs, retrain_lr=0.05, momentum=0.9, batch_size=64, seed=seed)


def run_models(method: str, original: torch.nn.Module, split: Split, args: argparse.Namespace) -> dict:
    """N runs of `method` (or N retrainings); per-run metrics and forget-set confidences."""
    metrics, confidences = [], []
    for run in range(args.models):
        if method == "retrain":
            cfg, retain = training_config(args, seed=run), split.retain
        else:
            cfg = dataclasses.replace(UnlearnConfig(epochs=args.unlearn_epochs, seed=run),
                                      **METHOD_SETTINGS.get(method, {}))
            draw = np.random.default_rng(1_000 + run).choice(len(split.retain), args.unlearn_retain, replace=False)
            retain = split.retain.subset(draw)
        start = time.perf_counter()
        model = unlearn(method, original, retain, split.forget, cfg)
        seconds = time.perf_counter() - start
        metrics.append(evaluate_model(model, original, split.retain_eval, split.forget, split.mia_test,
                                      seconds=seconds))
        # test accuracy on the full test draw (the MIA's non-members may be a class subset)
        test_acc = float((predict_logits(model, split.test_eval).argmax(1) == split.test_eval.y).mean())
        metrics[-1] = dataclasses.replace(metrics[-1], test_accuracy=test_acc)
        confidences.append(logit_scaled_confidence(predict_logits(model, split.forget), split.forget.y))
    return {"metrics": metrics, "confidences": np.stack(confidences)}


def summarise(method: str, kind: str, runs: dict, oracle: dict) -> dict:
    """One table row: means over the runs, gaps to the retrained models, the forgetting score."""
    def mean(field: str, source: dict = runs) -> float:
        return float(np.mean([getattr(m, field) for m in source["metrics"]]))

    if method == "retrain":  # the oracle against itself: F = 1 by construction, so not reported
        quality, value = float("nan"), float("nan")
    else:
        score = forgetting_score(
            runs["confidences"], oracle["confidences"],
            unlearned_retain_accuracy=[m.retain_accuracy for m in runs["metrics"]],
            retrained_retain_accuracy=[m.retain_accuracy for m in oracle["metrics"]],
            unlearned_test_accuracy=[m.test_accuracy for m in runs["metrics"]],
            retrained_test_accuracy=[m.test_accuracy for m in oracle["metrics"]])
        quality, value = score.forgetting_quality, score.score
    return {
        "kind": kind, "method": method, "models": len(runs["metrics"]),
        "forget_acc": mean("forget_accuracy"), "retain_acc": mean("retain_accuracy"),
        "test_acc": mean("test_accuracy"),
        "gap_forget": mean("forget_accuracy") - mean("forget_accuracy", oracle),
        "gap_retain": mean("retain_accuracy") - mean("retain_accuracy", oracle),
        "gap_test": mean("test_accuracy") - mean("test_accuracy", oracle),
        "mia_auc": mean("mia_auc"), "forgetting_quality": quality, "score": value,
        "seconds": mean("seconds"), "pct_changed": 100 * mean("fraction_changed"),
    }


def write_outputs(rows: list[dict], out: Path, num_models: int) -> str:
    """results.csv, table.md and scores.png; returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    res = epsilon_resolution(num_models)
    header = ("| forget set | method | forget acc | retain acc | test acc | gap forget | gap retain | gap test "
              "| MIA AUC | F | score | s/run | % params changed |")
    lines = [(f"N = {num_models} models per side: eps resolved up to {res.max_finite_epsilon:.2f}, "
             f"lowest non-zero H = {res.lowest_nonzero_score:g}."), "", header, "|" + "---|" * 2 + "---:|" * 11]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['method']} | {100 * r['forget_acc']:.1f} | {100 * r['retain_acc']:.1f} "
                     f"| {100 * r['test_acc']:.1f} | {100 * r['gap_forget']:+.1f} | {100 * r['gap_retain']:+.1f} "
                     f"| {100 * r['gap_test']:+.1f} | {r['mia_auc']:.3f} | {r['forgetting_quality']:.3f} "
                     f"| {r['score']:.3f} | {r['seconds']:.1f} | {r['pct_changed']:.1f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        chosen = [r for r in rows if r["kind"] == kind]
        xs = np.arange(len(chosen))
        ax.bar(xs - 0.2, [np.nan_to_num(r["score"]) for r in chosen], 0.4, label="score (F x utility)")
        ax.bar(xs + 0.2, [r["test_acc"] for r in chosen], 0.4, label="test accuracy")
        ax.set_xticks(xs, [f"{r['method']}\n{r['pct_changed']:.0f}%" for r in chosen], fontsize=7, rotation=30,
                      ha="right")
        ax.set_title(f"forget set: {kind} (N = {num_models}; % = params changed)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=120)
    plt.close(fig)
    return table


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    train, test = load_data(args)
    template = build_model("cnn", tuple(train.x.shape[1:]), 10, seed=0)
    original = unlearn("retrain", template, train, train.subset(np.arange(0)), training_config(args, ORIGINAL_SEED))
    print(f"original model: {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for kind in args.kinds:
        split = make_split(kind, train, test, args)
        oracle = run_models("retrain", original, split, args)
        rows.append(summarise("retrain", kind, oracle, oracle))
        write_outputs(rows, Path(args.out), args.models)
        print(f"[{kind}] retrain x{args.models}: {time.perf_counter() - started:.0f} s", flush=True)
        for method in args.methods:
            rows.append(summarise(method, kind, run_models(method, original, split, args), oracle))
            write_outputs(rows, Path(args.out), args.models)  # after every method: a cut-short run keeps its rows
            print(f"[{kind}] {method}: score {rows[-1]['score']:.3f}, test acc {rows[-1]['test_acc']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(write_outputs(rows, Path(args.out), args.models))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
