"""Local vs non-local merging at CPU scale: normalized accuracy (merged / expert) of Task Arithmetic and TIES,
with and without permutation alignment, with and without TACT's per-task variance correction.

Setup (per seed): Fashion-MNIST, tasks = class subsets (task 0: classes 0-4, task 1: classes 5-9), a small model
(`mlp` by default). A "pretraining" phase trains on all classes; each expert then fine-tunes on its task.
- local: both experts fine-tune from ONE pretrained model, which is the merge base;
- non-local (`--nonlocal pretrained`, default): each expert fine-tunes from its OWN pretrained model (different
  initialisation seed and data order). The merge base is the midpoint of the two pretrained models; with
  alignment, pretrained model B is first permuted onto A by weight matching (head zeroed, as in the TACT code) and
  the same permutation is applied to expert B.
- non-local (`--nonlocal scratch`): no shared pretraining at all; each expert trains from its own random init on
  its task only; alignment matches expert B onto expert A; the base is the midpoint of the (aligned) inits.
Every task keeps its expert's head (the last Linear layer; it is excluded from merging). Accuracy is within the
task's classes. lambda is chosen per configuration on a held-out validation split (grid below), with TACT fitted
for every candidate when TACT is on. TACT corrects the hidden Linear layers' outputs per task to the expert's
statistics, measured on 1000 of the task's training images.

Writes `results/bench_merging/merging.csv` (one row per seed, setting, alignment, method, TACT, task) and
`summary.md` + `normalized_accuracy.png`, and prints the table. Measured: 22 CPU seconds for 3 seeds with the mlp
(under 3 minutes of wall time on 2 loaded cores). `--model cnn` is far slower (its first seed's local setting alone
took over 20 minutes of wall time on the loaded machine): reduce `--train-per-class` / `--test-per-class` for it.

    .venv/bin/python simulations/bench_merging.py --seeds 3
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsparse.alignment import apply_permutation, permutation_spec, weight_matching
from fedsparse.data import load_dataset
from fedsparse.merging import TACTModel, expert_statistics, interpolate, merge_models
from fedsparse.models import build_model

REPO = Path(__file__).resolve().parent.parent
TASKS = {"t0": (0, 1, 2, 3, 4), "t1": (5, 6, 7, 8, 9)}
SCALE_GRID = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5)
METHODS = ("task_arithmetic", "ties")


@dataclass(frozen=True)
class TaskData:
    """One task's train / validation / test arrays (labels are the original class ids)."""

    classes: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Row:
    """One measurement: normalized accuracy of a merged model on one task."""

    seed: int
    setting: str
    aligned: bool
    method: str
    tact: bool
    task: str
    scale: float
    merged_accuracy: float
    expert_accuracy: float

    @property
    def normalized(self) -> float:
        return self.merged_accuracy / self.expert_accuracy


def task_splits(per_class_train: int, per_class_val: int, per_class_test: int, seed: int) -> tuple[dict, tuple]:
    """Per task: class-subset splits of Fashion-MNIST; plus the pretraining set (all classes)."""
    data = load_dataset("fashion-mnist")
    rng = np.random.default_rng(seed)
    tasks = {}
    pre_x, pre_y = [], []
    for task, classes in TASKS.items():
        parts: dict[str, list[np.ndarray]] = {name: [] for name in ("xtr", "ytr", "xv", "yv", "xte", "yte")}
        for label in classes:
            train_index = rng.permutation(np.flatnonzero(data.y_train == label))
            test_index = np.flatnonzero(data.y_test == label)[:per_class_test]
            chosen = train_index[:per_class_train]
            val = train_index[per_class_train:per_class_train + per_class_val]
            pretrain = train_index[per_class_train + per_class_val:2 * per_class_train + per_class_val]
            parts["xtr"].append(data.x_train[chosen])
            parts["ytr"].append(data.y_train[chosen])
            parts["xv"].append(data.x_train[val])
            parts["yv"].append(data.y_train[val])
            parts["xte"].append(data.x_test[test_index])
            parts["yte"].append(data.y_test[test_index])
            pre_x.append(data.x_train[pretrain])
            pre_y.append(data.y_train[pretrain])
        tasks[task] = TaskData(classes, *(np.concatenate(parts[name]) for name in
                                          ("xtr", "ytr", "xv", "yv", "xte", "yte")))
    return tasks, (np.concatenate(pre_x), np.concatenate(pre_y)), data.input_shape


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, seed: int) -> nn.Module:
    """Plain SGD with momentum 0.9, batch 64, in place."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 64):
            index = order[start:start + 64]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xt[index]), yt[index]).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def task_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]) -> float:
    """Accuracy with the prediction restricted to the task's classes."""
    logits = model(torch.from_numpy(x))[:, list(classes)]
    predicted = torch.tensor(classes)[logits.argmax(1)]
    return float((predicted == torch.from_numpy(y).long()).float().mean())


def head_name(model_name: str) -> str:
    return {"mlp": "5", "cnn": "3"}[model_name]


def corrected_layers(model_name: str) -> list[str]:
    return {"mlp": ["1", "3"], "cnn": ["0.0", "0.3", "1"]}[model_name]


def align_to(model_name: str, reference: nn.Module, other: nn.Module, experts: list[nn.Module]) -> list[nn.Module]:
    """Weight-match `other` onto `reference` (heads zeroed) and apply that permutation to `experts`."""
    spec = permutation_spec(model_name, reference)
    head = head_name(model_name)

    def without_head(model: nn.Module) -> dict[str, torch.Tensor]:
        return {key: torch.zeros_like(value) if key.startswith(head + ".") else value
                for key, value in model.state_dict().items()}

    permutation = weight_matching(spec, without_head(reference), without_head(other)).permutation
    aligned = []
    for expert in experts:
        moved = copy.deepcopy(expert)
        moved.load_state_dict(apply_permutation(spec, permutation, expert.state_dict()))
        aligned.append(moved)
    return aligned


def evaluate_merge(model_name: str, base: dict[str, torch.Tensor], experts: list[nn.Module], tasks: dict,
                   method: str, tact: bool, scale: float, split: str) -> dict[str, float]:
    """Per-task accuracy of the merged body with each task's expert head (and TACT corrections when asked)."""
    head = head_name(model_name)
    merged = copy.deepcopy(experts[0])
    merged.load_state_dict(merge_models(base, [e.state_dict() for e in experts], method, scale=scale,
                                        exclude=(head,)))
    layers = corrected_layers(model_name)
    wrapper = TACTModel(merged, layers if tact else [], head=head)
    accuracies = {}
    for (task, data), expert in zip(tasks.items(), experts, strict=True):
        calibration = [torch.from_numpy(data.x_train[:1000])]
        target = expert_statistics(expert, layers, calibration) if tact else {}
        wrapper.add_task(task, target, calibration, head=dict(expert.named_modules())[head])
        wrapper.use_task(task)
        x, y = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
        accuracies[task] = task_accuracy(wrapper, x, y, data.classes)
    return accuracies


def run_seed(seed: int, args: argparse.Namespace) -> list[Row]:
    """All configurations for one seed."""
    torch.manual_seed(seed)
    tasks, (pre_x, pre_y), shape = task_splits(args.train_per_class, 100, args.test_per_class, seed)
    pretrained = [train(build_model(args.model, shape, 10, seed=1000 * seed + index), pre_x, pre_y,
                        epochs=args.pretrain_epochs, lr=0.05, seed=seed * 10 + index) for index in (0, 1)]

    def fine_tune(start: nn.Module, task: str, index: int) -> nn.Module:
        return train(copy.deepcopy(start), tasks[task].x_train, tasks[task].y_train, epochs=args.finetune_epochs,
                     lr=args.finetune_lr, seed=seed * 100 + index)

    local_experts = [fine_tune(pretrained[0], task, i) for i, task in enumerate(tasks)]
    if args.nonlocal_kind == "pretrained":
        starts = pretrained
        nonlocal_experts = [fine_tune(pretrained[i], task, i) for i, task in enumerate(tasks)]
        matched = pretrained  # TACT's recipe: align the two pretrained models, apply that to expert B
    else:
        starts = [build_model(args.model, shape, 10, seed=1000 * seed + 500 + index) for index in (0, 1)]
        nonlocal_experts = [train(copy.deepcopy(starts[i]), tasks[task].x_train, tasks[task].y_train,
                                  epochs=args.pretrain_epochs + args.finetune_epochs, lr=0.05, seed=seed * 100 + i)
                            for i, task in enumerate(tasks)]
        matched = nonlocal_experts  # no shared pretraining: align the experts themselves
    setups = {
        ("local", False): (pretrained[0].state_dict(), local_experts),
        ("nonlocal", False): (interpolate(starts[0].state_dict(), starts[1].state_dict(), 0.5), nonlocal_experts),
    }
    aligned_start_b, aligned_expert_b = align_to(args.model, matched[0], matched[1], [starts[1], nonlocal_experts[1]])
    setups[("nonlocal", True)] = (interpolate(starts[0].state_dict(), aligned_start_b.state_dict(), 0.5),
                                  [nonlocal_experts[0], aligned_expert_b])
    rows = []
    for (setting, aligned), (base, experts) in setups.items():
        expert_accuracy = {task: task_accuracy(expert, data.x_test, data.y_test, data.classes)
                           for (task, data), expert in zip(tasks.items(), experts, strict=True)}
        for method in METHODS:
            for tact in (False, True):
                validation = {scale: statistics.mean(evaluate_merge(args.model, base, experts, tasks, method, tact,
                                                                    scale, "val").values())
                              for scale in SCALE_GRID}
                scale = max(validation, key=validation.get)
                test = evaluate_merge(args.model, base, experts, tasks, method, tact, scale, "test")
                rows += [Row(seed, setting, aligned, method, tact, task, scale, test[task], expert_accuracy[task])
                         for task in tasks]
        print(f"seed {seed} {setting} aligned={aligned} done", flush=True)
    return rows


def summarize(rows: list[Row]) -> list[dict[str, str | float]]:
    """Mean and sd over seeds of the per-seed mean (over tasks) normalized accuracy, per configuration."""
    groups: dict[tuple, dict[int, list[float]]] = {}
    for row in rows:
        key = (row.setting, row.aligned, row.method, row.tact)
        groups.setdefault(key, {}).setdefault(row.seed, []).append(row.normalized)
    table = []
    for (setting, aligned, method, tact), per_seed in groups.items():
        values = [100 * statistics.mean(v) for v in per_seed.values()]
        table.append({"setting": setting, "aligned": "yes" if aligned else "no", "method": method,
                      "tact": "yes" if tact else "no", "mean": statistics.mean(values),
                      "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": len(values)})
    return table


def write_outputs(rows: list[Row], table: list[dict], out: Path) -> str:
    """CSV of every row, Markdown summary, PNG bar chart; returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "merging.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "setting", "aligned", "method", "tact", "task", "scale", "merged_accuracy",
                         "expert_accuracy", "normalized_accuracy"])
        for row in rows:
            writer.writerow([row.seed, row.setting, row.aligned, row.method, row.tact, row.task, row.scale,
                             f"{row.merged_accuracy:.4f}", f"{row.expert_accuracy:.4f}", f"{row.normalized:.4f}"])
    lines = ["| setting | aligned | method | TACT | normalized acc % (mean ± sd) | seeds |",
             "|---|---|---|---|---:|---:|"]
    lines += [f"| {r['setting']} | {r['aligned']} | {r['method']} | {r['tact']} | {r['mean']:.1f} ± {r['sd']:.1f} "
              f"| {r['seeds']} |" for r in table]
    markdown = "\n".join(lines)
    (out / "summary.md").write_text(markdown + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['setting']}{'+align' if r['aligned'] == 'yes' else ''}\n{r['method'].replace('task_arithmetic', 'TA')}"
              for r in table if r["tact"] == "no"]
    without = [r for r in table if r["tact"] == "no"]
    with_tact = [r for r in table if r["tact"] == "yes"]
    positions = np.arange(len(without))
    figure, axis = plt.subplots(figsize=(9, 4))
    axis.bar(positions - 0.2, [r["mean"] for r in without], 0.4, yerr=[r["sd"] for r in without], label="merge")
    axis.bar(positions + 0.2, [r["mean"] for r in with_tact], 0.4, yerr=[r["sd"] for r in with_tact],
             label="merge + TACT")
    axis.set_xticks(positions, labels, fontsize=8)
    axis.set_ylabel("normalized accuracy % (merged / expert)")
    axis.axhline(100, color="grey", linewidth=0.5)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "normalized_accuracy.png", dpi=120)
    plt.close(figure)
    return markdown


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=400)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--nonlocal", dest="nonlocal_kind", choices=["pretrained", "scratch"], default="pretrained",
                        help="non-local experts: fine-tuned from different pretrained models, or trained from "
                             "different random inits on their task only")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_merging")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.process_time()
    rows = [row for seed in range(args.seeds) for row in run_seed(seed, args)]
    markdown = write_outputs(rows, summarize(rows), args.out)
    print(markdown)
    print(f"CPU seconds: {time.process_time() - started:.0f}; outputs in {args.out}")


if __name__ == "__main__":
    main()
