"""Centralised unlearning benchmark: every method of `fedsparse.unlearning` on Fashion-MNIST (cnn) or the CIFAR-10
subset (resnet18), every metric as mean +- sd over N runs.

Setup (Fashion-MNIST defaults; every number is a flag):
- Data (`--dataset`): the first `--train-size` training images (10,000); `--eval-size` test images (1,000, a fixed
  random draw) for test accuracy and the MIA; retain accuracy on a fixed random `--eval-size` of the retain set (to
  keep evaluation cheap). `cifar10` is the JPEG subset of fedsparse.data (10k shuffled training images, 1,000 per
  class); its inputs are standardised per channel with the mean / sd of the training subset
  (`fedsparse.data.channel_stats`; `--normalize`, on by default for cifar10 only). `digits` (sklearn's 8x8 digits)
  exists for fast tests.
- Model (`--model`): the dataset's default, `cnn` for the grey-image sets and `resnet18` (GroupNorm) for cifar10.
- Forget sets, `--forget-fraction` (10%) of the training subset: `uniform` (drawn uniformly) and `class` (drawn only
  from classes 2 and 5 -- Fashion-MNIST pullover and sandal, CIFAR-10 bird and dog -- half of their images at the
  default sizes, as DEL's non-IID split of CIFAR-10).
- The original model: trained on the whole training subset (`--train-epochs`, SGD `--train-lr`, momentum 0.9, batch
  64), one per dataset (shared by both forget sets).
- The oracle: N models retrained from scratch on the retain set with the same recipe, seeds 0..N-1.
- Every method runs N times from the one original model (seeds 0..N-1), each run on its own random draw of
  `--unlearn-retain` retain images (the unlearning budget: a fraction of retraining's cost) plus the forget set.
- Metrics: forget / retain / test accuracy, the loss-threshold MIA AUC (forget vs test; for `class`, vs the test
  images of classes 2 and 5), seconds per run and the share of parameters changed, each as mean and sd over the N
  runs; the gaps of the means to the retrained models' means; and the NeurIPS 2023 forgetting score of the N
  unlearned vs the N retrained models (F, and F x retain ratio x test ratio), one number per cell since it is a
  statistic of the two sets of N models. With N models the score resolves eps only up to ln(N - 1) (ln 7 = 1.95 at
  N = 8; see `fedsparse.unlearning.evaluate.epsilon_resolution`).

Writes `results.csv` (one row per method and forget set), `runs.csv` (one row per model), `table.md` and `scores.png`
under `--out` (default results/bench_unlearning), rewritten after every method, and prints the table. One torch
thread. The two forget settings are independent: they can run as two processes (`--kinds uniform --out A`,
`--kinds class --out B`; each trains the same original model).

    python simulations/bench_unlearning.py [--dataset cifar10] [--models 8] [--kinds uniform class] [--methods ...]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedsparse.data import channel_stats, load_dataset
from fedsparse.models import build_model
from fedsparse.unlearning import UNLEARNING_METHODS, ArrayData, UnlearnConfig, unlearn
from fedsparse.unlearning.evaluate import (
    accuracy,
    cross_entropy_per_example,
    epsilon_resolution,
    forgetting_score,
    fraction_changed,
    logit_scaled_confidence,
    loss_threshold_mia_auc,
    predict_logits,
)

REPO = Path(__file__).resolve().parent.parent
FORGET_CLASSES = (2, 5)
ORIGINAL_SEED = 10_000
DEFAULT_MODEL = {"fashion-mnist": "cnn", "cifar10": "resnet18", "digits": "cnn"}
NORMALIZED_BY_DEFAULT = ("cifar10",)

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
# Per-model metrics that get a mean and an sd in the table (name in `RunMetrics` -> column prefix).
SPREAD_FIELDS = ("forget_acc", "retain_acc", "test_acc", "mia_auc", "seconds", "pct_changed")


@dataclasses.dataclass(frozen=True)
class Split:
    """One forget setting: the sets a method sees and the sets it is evaluated on. `mia_test_mask` picks the MIA's
    non-members out of `test_eval` (all of it for `uniform`, the forget classes for `class`)."""

    kind: str
    retain: ArrayData
    forget: ArrayData
    retain_eval: ArrayData
    test_eval: ArrayData
    mia_test_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class RunMetrics:
    """What one unlearned (or retrained) model scores; accuracies in [0, 1], `pct_changed` in percent."""

    forget_acc: float
    retain_acc: float
    test_acc: float
    mia_auc: float
    seconds: float
    pct_changed: float


@dataclasses.dataclass(frozen=True)
class MethodRuns:
    """The N runs of one method on one forget set: their metrics and the forget-set confidences [N, forget]."""

    metrics: list[RunMetrics]
    confidences: np.ndarray


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line settings; `--model` and `--normalize` default to the dataset's choice."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "results" / "bench_unlearning"))
    parser.add_argument("--dataset", default="fashion-mnist", choices=list(DEFAULT_MODEL))
    parser.add_argument("--model", default=None, choices=["cnn", "resnet18", "mlp"],
                        help="default: cnn (fashion-mnist, digits), resnet18 (cifar10)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="standardise inputs per channel with the training subset's stats (default: cifar10)")
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--eval-size", type=int, default=1_000, help="test images and retain images evaluated")
    parser.add_argument("--forget-fraction", type=float, default=0.1)
    parser.add_argument("--kinds", nargs="+", default=["uniform", "class"], choices=["uniform", "class"])
    methods = ["del"] + [m for m in UNLEARNING_METHODS if m not in ("retrain", "del")]  # the method of interest first
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--models", type=int, default=8, help="N unlearned and N retrained models per setting")
    parser.add_argument("--train-epochs", type=int, default=2, help="epochs of the original and retrained models")
    parser.add_argument("--train-lr", type=float, default=0.05, help="SGD lr of the original and retrained models")
    parser.add_argument("--unlearn-retain", type=int, default=2_500, help="retain images per unlearning run")
    parser.add_argument("--unlearn-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="data draws")
    parser.add_argument("--device", default="cpu", help="torch device of every training and unlearning run "
                        "(cpu, cuda, ...; cpu runs use one thread)")
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = DEFAULT_MODEL[args.dataset]
    if args.normalize is None:
        args.normalize = args.dataset in NORMALIZED_BY_DEFAULT
    if args.models < 3:
        raise ValueError(f"--models must be >= 3 (the forgetting score compares N vs N models), got {args.models}")
    return args


def load_data(args: argparse.Namespace) -> tuple[ArrayData, ArrayData]:
    """The training subset and the test draw, standardised with the training subset's stats if `args.normalize`."""
    dataset = load_dataset(args.dataset)
    if args.train_size > len(dataset.y_train) or args.eval_size > len(dataset.y_test):
        raise ValueError(f"{args.dataset} has {len(dataset.y_train)} training and {len(dataset.y_test)} test images; "
                         f"asked for {args.train_size} and {args.eval_size}")
    x_train = dataset.x_train[:args.train_size].astype(np.float32)
    test_idx = np.random.default_rng(args.seed).choice(len(dataset.y_test), args.eval_size, replace=False)
    x_test = dataset.x_test[test_idx].astype(np.float32)
    if args.normalize:
        stats = channel_stats(x_train)
        mean = np.asarray(stats.mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(stats.std, dtype=np.float32)[None, :, None, None]
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return (ArrayData(x_train, dataset.y_train[:args.train_size].astype(np.int64)),
            ArrayData(x_test, dataset.y_test[test_idx].astype(np.int64)))


def make_split(kind: str, train: ArrayData, test: ArrayData, args: argparse.Namespace) -> Split:
    """Retain / forget sets of one kind, and the evaluation draws."""
    rng = np.random.default_rng(args.seed + 1)
    count = round(args.forget_fraction * len(train))
    if kind == "uniform":
        forget_idx = rng.choice(len(train), count, replace=False)
        mia_test_mask = np.ones(len(test), dtype=bool)
    else:
        pool = np.flatnonzero(np.isin(train.y, FORGET_CLASSES))
        if count > len(pool):
            raise ValueError(f"the class-skewed forget set needs {count} images of classes {FORGET_CLASSES}, "
                             f"the training subset has {len(pool)}")
        forget_idx = rng.choice(pool, count, replace=False)
        mia_test_mask = np.isin(test.y, FORGET_CLASSES)
    is_forget = np.zeros(len(train), dtype=bool)
    is_forget[forget_idx] = True
    retain = train.subset(~is_forget)
    retain_eval = retain.subset(rng.choice(len(retain), min(args.eval_size, len(retain)), replace=False))
    return Split(kind, retain, train.subset(is_forget), retain_eval, test, mia_test_mask)


def training_config(args: argparse.Namespace, seed: int) -> UnlearnConfig:
    """The recipe of the original and the retrained models."""
    return UnlearnConfig(retrain_epochs=args.train_epochs, retrain_lr=args.train_lr, momentum=0.9, batch_size=64,
                         seed=seed, device=args.device)


def score_model(model: torch.nn.Module, original: torch.nn.Module, split: Split, seconds: float) -> tuple[RunMetrics,
                                                                                                           np.ndarray]:
    """One model's metrics and its forget-set confidences; each evaluation set goes through the model once."""
    forget_logits = predict_logits(model, split.forget)
    test_logits = predict_logits(model, split.test_eval)
    mia_test_losses = cross_entropy_per_example(test_logits, split.test_eval.y)[split.mia_test_mask]
    metrics = RunMetrics(
        forget_acc=accuracy(forget_logits, split.forget.y),
        retain_acc=accuracy(predict_logits(model, split.retain_eval), split.retain_eval.y),
        test_acc=accuracy(test_logits, split.test_eval.y),
        mia_auc=loss_threshold_mia_auc(cross_entropy_per_example(forget_logits, split.forget.y), mia_test_losses),
        seconds=seconds,
        pct_changed=100 * fraction_changed(original, model),
    )
    return metrics, logit_scaled_confidence(forget_logits, split.forget.y)


def run_models(method: str, original: torch.nn.Module, split: Split, args: argparse.Namespace) -> MethodRuns:
    """N runs of `method` (or N retrainings), run r with seed r and, for a method, its own retain draw."""
    metrics, confidences = [], []
    for run in range(args.models):
        if method == "retrain":
            cfg, retain = training_config(args, seed=run), split.retain
        else:
            cfg = dataclasses.replace(UnlearnConfig(epochs=args.unlearn_epochs, seed=run, device=args.device),
                                      **METHOD_SETTINGS.get(method, {}))
            budget = min(args.unlearn_retain, len(split.retain))
            draw = np.random.default_rng(1_000 + run).choice(len(split.retain), budget, replace=False)
            retain = split.retain.subset(draw)
        start = time.perf_counter()
        model = unlearn(method, original, retain, split.forget, cfg)
        run_metrics, run_confidences = score_model(model, original, split, time.perf_counter() - start)
        metrics.append(run_metrics)
        confidences.append(run_confidences)
    return MethodRuns(metrics, np.stack(confidences))


def summarise(method: str, kind: str, runs: MethodRuns, oracle: MethodRuns) -> dict:
    """One table row: mean and sd (ddof 1) over the runs, gaps of the means to the retrained models' means, and
    the forgetting score (not defined for retraining against itself: NaN)."""
    def values(field: str, source: MethodRuns) -> np.ndarray:
        return np.array([getattr(m, field) for m in source.metrics])

    if method == "retrain":
        quality, value = float("nan"), float("nan")
    else:
        score = forgetting_score(
            runs.confidences, oracle.confidences,
            unlearned_retain_accuracy=values("retain_acc", runs), retrained_retain_accuracy=values("retain_acc", oracle),
            unlearned_test_accuracy=values("test_acc", runs), retrained_test_accuracy=values("test_acc", oracle))
        quality, value = score.forgetting_quality, score.score
    row: dict = {"kind": kind, "method": method, "models": len(runs.metrics)}
    for field in SPREAD_FIELDS:
        row[field] = float(values(field, runs).mean())
        row[f"{field}_sd"] = float(values(field, runs).std(ddof=1))
    for field in ("forget_acc", "retain_acc", "test_acc"):
        row[f"gap_{field.removesuffix('_acc')}"] = row[field] - float(values(field, oracle).mean())
    row["forgetting_quality"], row["score"] = quality, value
    return row


def format_table(rows: list[dict], num_models: int, title: str) -> str:
    """The Markdown table: accuracies in %, mean +- sd over the N runs."""
    res = epsilon_resolution(num_models)
    intro = (f"{title}. N = {num_models} models per side (unlearning runs / retrained models, seeds "
             f"0..{num_models - 1}): eps resolved up to {res.max_finite_epsilon:.2f}, lowest non-zero H = "
             f"{res.lowest_nonzero_score:g}. Mean ± sd over the N runs; gaps are differences of means to retrain; "
             "F and score are one statistic of the N vs N models.")
    header = ("| forget set | method | forget acc | retain acc | test acc | gap forget | gap retain | gap test "
              "| MIA AUC | F | score | s/run | % params changed |")
    lines = [intro, "", header, "|" + "---|" * 2 + "---:|" * 11]

    def spread(r: dict, field: str, scale: float, digits: int) -> str:
        return f"{scale * r[field]:.{digits}f} ± {scale * r[field + '_sd']:.{digits}f}"

    for r in rows:
        lines.append(f"| {r['kind']} | {r['method']} | {spread(r, 'forget_acc', 100, 1)} "
                     f"| {spread(r, 'retain_acc', 100, 1)} | {spread(r, 'test_acc', 100, 1)} "
                     f"| {100 * r['gap_forget']:+.1f} | {100 * r['gap_retain']:+.1f} | {100 * r['gap_test']:+.1f} "
                     f"| {spread(r, 'mia_auc', 1, 3)} | {r['forgetting_quality']:.3f} | {r['score']:.3f} "
                     f"| {spread(r, 'seconds', 1, 1)} | {spread(r, 'pct_changed', 1, 1)} |")
    return "\n".join(lines)


def plot_scores(rows: list[dict], path: Path, num_models: int, title: str) -> None:
    """Bar chart per forget set: score and test accuracy of every method (sd as error bars on test accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        chosen = [r for r in rows if r["kind"] == kind]
        xs = np.arange(len(chosen))
        ax.bar(xs - 0.2, [np.nan_to_num(r["score"]) for r in chosen], 0.4, label="score (F x utility)")
        ax.bar(xs + 0.2, [r["test_acc"] for r in chosen], 0.4, yerr=[r["test_acc_sd"] for r in chosen],
               label="test accuracy (± sd)")
        ax.set_xticks(xs, [f"{r['method']}\n{r['pct_changed']:.0f}%" for r in chosen], fontsize=7, rotation=30,
                      ha="right")
        ax.set_title(f"{title}, forget set: {kind}\n(N = {num_models}; % = params changed)", fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict], run_rows: list[dict], out: Path, num_models: int, title: str) -> str:
    """results.csv, runs.csv, table.md and scores.png; returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("results.csv", rows), ("runs.csv", run_rows)):
        with open(out / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    table = format_table(rows, num_models, title)
    (out / "table.md").write_text(table + "\n")
    plot_scores(rows, out / "scores.png", num_models, title)
    return table


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the table rows (also written under `--out`)."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    title = f"{args.dataset} ({args.model}, {args.train_size} training images)"
    train, test = load_data(args)
    template = build_model(args.model, tuple(train.x.shape[1:]), 10, seed=0)
    original = unlearn("retrain", template, train, train.subset(np.arange(0)), training_config(args, ORIGINAL_SEED))
    original_test = accuracy(predict_logits(original, test), test.y)
    print(f"original model: test accuracy {original_test:.3f}, {time.perf_counter() - started:.0f} s", flush=True)
    rows: list[dict] = []
    run_rows: list[dict] = []
    out = Path(args.out)
    for kind in args.kinds:
        split = make_split(kind, train, test, args)
        oracle = run_models("retrain", original, split, args)
        for method, runs in [("retrain", oracle)] + [(m, None) for m in args.methods]:
            runs = runs or run_models(method, original, split, args)
            rows.append(summarise(method, kind, runs, oracle))
            run_rows += [{"kind": kind, "method": method, "seed": seed, **dataclasses.asdict(m)}
                         for seed, m in enumerate(runs.metrics)]
            write_outputs(rows, run_rows, out, args.models, title)  # after every method: a cut-short run keeps rows
            print(f"[{kind}] {method}: score {rows[-1]['score']:.3f}, test acc {rows[-1]['test_acc']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(write_outputs(rows, run_rows, out, args.models, title))
    print(f"total {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
