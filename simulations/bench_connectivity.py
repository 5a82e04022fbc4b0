"""Simultaneous linear connectivity modulo permutation at CPU scale (Sharma et al. 2024, arXiv:2404.06498): barrier
vs width, and one permutation (found between two FINAL models) applied along their training trajectories and along
iterative magnitude pruning (IMP) with rewinding.

Setup: Fashion-MNIST, a stratified random training subset (`--train-size`) and a test subset (`--test-size`) on
which every barrier is measured (`fedsparse.alignment.linear_barrier` with 11 points, `simplex_barrier` with
resolution 4 for 3 models). Models are `fedsparse.models` `mlp` (or `cnn`) with a width multiplier; training is SGD
(momentum 0.9, batch 64) with a per-model data order. Alignment is weight matching (`fedsparse.alignment.
weight_matching`, data-free). Barriers: loss barrier in nats, accuracy barrier in percentage points.

Parts (`--parts`, default all three); each repeats over `--seeds` independent seed groups:
- `width`: per width, 3 models from different inits; 2-way barrier of models 0 and 1, plain vs B weight-matched
  onto A; 3-way simplex barrier, plain vs models 1 and 2 both matched onto model 0; and the pairwise barrier between
  the two aligned models 1 and 2 (transitivity).
- `trajectory`: two models, checkpoints at init (step 0), after the `--early-steps` optimizer steps and at the end
  of every epoch (the step column counts optimizer steps); the permutation found between the final
  models is applied to every checkpoint of model B; barrier per checkpoint with no alignment, with that final
  permutation, and (reference) with the permutation matched at that checkpoint itself.
- `imp`: each model trains to the end, keeping a rewind checkpoint at `--rewind-epoch`; each level prunes
  `--prune-fraction` of the remaining maskable weights (global magnitude over Linear/Conv weights of the previous
  level's final model), rewinds the surviving weights to the rewind checkpoint and retrains with the mask (pruned
  weights stay exactly 0). The permutation between the two last-level models is applied to every level; barrier per
  level, plain / final permutation / own permutation.

Writes `results/bench_connectivity/connectivity.csv` (one row per seed, part, step, comparison and alignment),
`summary.md`, `width.png`, `trajectory.png`, `imp.png`, and prints the tables (mean +- sd over seeds).

Measured on 2 cores shared with other jobs (the README's figures), with the defaults (4,000 train / 2,000 test, 6
epochs, lr 0.05): `--parts width --seeds 2` 177 CPU s (30 min wall: the x8 models dominate); `--parts trajectory imp
--seeds 3` 57 CPU s; `--parts imp --levels 10 --seeds 3` 61 CPU s. `--model cnn` is much slower: `--parts width
--widths 1 2 --train-size 2000 --test-size 1000 --epochs 5` took 126 CPU s per seed.

    .venv/bin/python simulations/bench_connectivity.py --parts width --seeds 2 --out results/bench_connectivity/width
    .venv/bin/python simulations/bench_connectivity.py --parts trajectory imp --seeds 3 \
        --out results/bench_connectivity/sequences
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsparse.alignment import (
    BarrierResult,
    apply_permutation,
    dataset_evaluator,
    linear_barrier,
    permutation_spec,
    simplex_barrier,
    weight_matching,
)
from fedsparse.alignment.spec import Permutation, PermutationSpec
from fedsparse.data import load_dataset
from fedsparse.merging.state import StateDict
from fedsparse.models import build_model, maskable_names
from fedsparse.sparse import topk_mask

REPO = Path(__file__).resolve().parent.parent
PARTS = ("width", "trajectory", "imp")


@dataclass(frozen=True)
class Data:
    """Training subset, and the test subset every barrier is measured on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class Row:
    """One barrier measurement.

    `comparison`: `pair` (models 0 and 1), `simplex3` (models 0, 1, 2) or `pair12` (models 1 and 2, both aligned to
    model 0). `alignment`: `none`, `final` (permutation found between the final models, applied at this step) or
    `own` (permutation found at this step). `step`: width multiplier, epoch, or IMP level per part.
    `loss_gap` / `accuracy_gap`: like the barriers but over the grid points strictly inside the segment/simplex and
    NOT clipped at 0 (negative: every mixture beats the mean of its endpoints; the barriers then read 0)."""

    part: str
    model: str
    width: int
    seed: int
    step: int
    density: float
    comparison: str
    alignment: str
    loss_barrier: float
    accuracy_barrier: float
    loss_gap: float
    accuracy_gap: float
    endpoint_accuracy: float


@dataclass(frozen=True)
class ImpRun:
    """One model's IMP run: per level (0 = dense), the mask (empty at level 0) and the final state."""

    masks: list[dict[str, torch.Tensor]]
    states: list[StateDict]


def load_data(train_size: int, test_size: int, seed: int) -> Data:
    """Stratified random subsets of Fashion-MNIST (same subsets for every model of a seed group)."""
    data = load_dataset("fashion-mnist")
    rng = np.random.default_rng(seed)

    def subset(y: np.ndarray, size: int) -> np.ndarray:
        per_class = size // 10
        return np.concatenate([rng.permutation(np.flatnonzero(y == label))[:per_class] for label in range(10)])

    train_index, test_index = subset(data.y_train, train_size), subset(data.y_test, test_size)
    return Data(data.x_train[train_index], data.y_train[train_index].astype(np.int64),
                data.x_test[test_index], data.y_test[test_index].astype(np.int64), data.input_shape)


def snapshot(model: nn.Module) -> StateDict:
    """A detached copy of the model's state dict."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def train_epochs(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, seed: int,
                 masks: dict[str, torch.Tensor] | None = None,
                 snapshot_steps: Sequence[int] | None = None) -> list[StateDict]:
    """Train `model` in place with SGD (momentum 0.9, batch 64); returns the state after every epoch (not the
    start), or with `snapshot_steps` the states after exactly those optimizer steps (counted from 1, in increasing
    order; `ValueError` for a step beyond the last). With `masks`, pruned weights are zeroed first and stay exactly 0: their gradients are zeroed before
    every step (so momentum never moves them) and the mask is re-applied after it."""
    masks = masks or {}
    parameters = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(parameters))
    if unknown:
        raise ValueError(f"masks name no parameter of the model: {unknown[:3]}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y).long()
    with torch.no_grad():
        for name, mask in masks.items():
            parameters[name].mul_(mask)
    steps_per_epoch = -(-len(inputs) // 64)
    wanted = sorted(set(snapshot_steps)) if snapshot_steps is not None else None
    if wanted and not 1 <= wanted[0] <= wanted[-1] <= epochs * steps_per_epoch:
        raise ValueError(f"snapshot steps must lie in 1..{epochs * steps_per_epoch}, got {wanted}")
    checkpoints = []
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), 64):
            step += 1
            index = order[start:start + 64]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(inputs[index]), targets[index]).backward()
            for name, mask in masks.items():
                parameters[name].grad.mul_(mask)
            optimizer.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    parameters[name].mul_(mask)
            if wanted is not None and step in wanted:
                checkpoints.append(snapshot(model))
        if wanted is None:
            checkpoints.append(snapshot(model))
    model.eval()
    return checkpoints


def prune_masks(state: StateDict, names: Sequence[str], previous: dict[str, torch.Tensor],
                fraction: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning of `fraction` of the weights still kept by `previous` (all kept when empty): the
    new mask keeps the largest |w| among the surviving weights and is contained in `previous`."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"prune fraction must be in (0, 1), got {fraction}")
    kept = {name: previous.get(name, torch.ones_like(state[name], dtype=torch.bool)).bool() for name in names}
    total = sum(mask.numel() for mask in kept.values())
    density = sum(int(mask.sum()) for mask in kept.values()) * (1.0 - fraction) / total
    # pruned weights score -1, below every |w|, so they can never come back
    scores = {name: torch.where(kept[name], state[name].abs(), torch.full_like(state[name], -1.0)) for name in names}
    return {name: mask.bool() for name, mask in topk_mask(scores, density).items()}


def iterative_magnitude_pruning(model: nn.Module, data: Data, *, epochs: int, rewind_epoch: int, levels: int,
                                fraction: float, lr: float, seed: int) -> ImpRun:
    """IMP with rewinding: dense training for `epochs` (checkpoint at `rewind_epoch`), then per level prune
    `fraction` of the remaining weights, rewind the rest to the checkpoint and retrain `epochs - rewind_epoch`."""
    if not 0 <= rewind_epoch < epochs:
        raise ValueError(f"need 0 <= rewind_epoch < epochs, got {rewind_epoch}, {epochs}")
    initial = snapshot(model)
    checkpoints = train_epochs(model, data.x_train, data.y_train, epochs=epochs, lr=lr, seed=seed)
    rewind = initial if rewind_epoch == 0 else checkpoints[rewind_epoch - 1]
    names = maskable_names(model)
    masks: list[dict[str, torch.Tensor]] = [{}]
    states = [checkpoints[-1]]
    for level in range(1, levels + 1):
        mask = prune_masks(states[-1], names, masks[-1], fraction)
        model.load_state_dict(rewind)
        final = train_epochs(model, data.x_train, data.y_train, epochs=epochs - rewind_epoch, lr=lr,
                             seed=seed + 7919 * level, masks={name: m.float() for name, m in mask.items()})[-1]
        masks.append(mask)
        states.append(final)
    return ImpRun(masks, states)


def mask_density(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of maskable weights kept (1.0 for no mask)."""
    if not masks:
        return 1.0
    return sum(int(mask.sum()) for mask in masks.values()) / sum(mask.numel() for mask in masks.values())


class Connectivity:
    """Barriers of one architecture on one data set (a template model, its permutation spec and an evaluator)."""

    def __init__(self, model_name: str, width: int, data: Data, num_points: int = 11, resolution: int = 4):
        self.model_name, self.width, self.data = model_name, width, data
        self.template = build_model(model_name, data.input_shape, 10, seed=0, width=width)
        self.spec: PermutationSpec = permutation_spec(model_name, self.template)
        self.evaluate = dataset_evaluator(data.x_test, data.y_test)
        self.num_points, self.resolution = num_points, resolution

    def match(self, state_a: StateDict, state_b: StateDict) -> Permutation:
        """Weight-matching permutation of B onto A."""
        return weight_matching(self.spec, state_a, state_b).permutation

    def permute(self, permutation: Permutation, state: StateDict) -> StateDict:
        return apply_permutation(self.spec, permutation, state)

    def pair(self, state_a: StateDict, state_b: StateDict) -> BarrierResult:
        return linear_barrier(self.template, state_a, state_b, self.evaluate, self.num_points)

    def simplex(self, states: Sequence[StateDict]) -> BarrierResult:
        return simplex_barrier(self.template, states, self.evaluate, self.resolution)


def endpoint_accuracy(result: BarrierResult) -> float:
    """Mean accuracy of the models at the vertices of the grid."""
    return statistics.mean(e.accuracy for w, e in zip(result.weights, result.evaluations, strict=True) if 1.0 in w)


def interior_gaps(result: BarrierResult) -> tuple[float, float]:
    """(max loss excess, max accuracy deficit) over the non-vertex grid points, signed (see `Row`)."""
    vertex = {w.index(1.0): e for w, e in zip(result.weights, result.evaluations, strict=True) if 1.0 in w}
    loss_gaps, accuracy_gaps = [], []
    for weights, evaluation in zip(result.weights, result.evaluations, strict=True):
        if 1.0 not in weights:
            loss_gaps.append(evaluation.loss - sum(w * vertex[i].loss for i, w in enumerate(weights)))
            accuracy_gaps.append(sum(w * vertex[i].accuracy for i, w in enumerate(weights)) - evaluation.accuracy)
    return max(loss_gaps), max(accuracy_gaps)


def make_row(part: str, tool: Connectivity, seed: int, step: int, density: float, comparison: str, alignment: str,
             result: BarrierResult) -> Row:
    loss_gap, accuracy_gap = interior_gaps(result)
    return Row(part, tool.model_name, tool.width, seed, step, density, comparison, alignment, result.loss_barrier,
               100 * result.accuracy_barrier, loss_gap, 100 * accuracy_gap, 100 * endpoint_accuracy(result))


def run_width(args: argparse.Namespace, data: Data, seed: int) -> list[Row]:
    """Part (i): 2-way and 3-way barriers, plain vs aligned, per width."""
    rows = []
    for width in args.widths:
        tool = Connectivity(args.model, width, data)
        states = []
        for index in range(3):
            model = build_model(args.model, data.input_shape, 10, seed=1000 * seed + index, width=width)
            states.append(train_epochs(model, data.x_train, data.y_train, epochs=args.epochs, lr=args.lr,
                                       seed=1000 * seed + 100 + index)[-1])
        aligned = [states[0]] + [tool.permute(tool.match(states[0], state), state) for state in states[1:]]
        rows.append(make_row("width", tool, seed, width, 1.0, "pair", "none", tool.pair(states[0], states[1])))
        rows.append(make_row("width", tool, seed, width, 1.0, "pair", "final", tool.pair(aligned[0], aligned[1])))
        rows.append(make_row("width", tool, seed, width, 1.0, "simplex3", "none", tool.simplex(states)))
        rows.append(make_row("width", tool, seed, width, 1.0, "simplex3", "final", tool.simplex(aligned)))
        rows.append(make_row("width", tool, seed, width, 1.0, "pair12", "final", tool.pair(aligned[1], aligned[2])))
        print(f"width seed {seed} x{width}: " + ", ".join(f"{r.comparison}/{r.alignment} {r.loss_barrier:.3f}"
                                                        for r in rows[-5:]), flush=True)
    return rows


def aligned_sequence(part: str, tool: Connectivity, seed: int, sequence_a: Sequence[StateDict],
                     sequence_b: Sequence[StateDict], steps: Sequence[int], densities: Sequence[float]) -> list[Row]:
    """Barrier at every step of two sequences: plain, with the last step's permutation, with the step's own."""
    final = tool.match(sequence_a[-1], sequence_b[-1])
    rows = []
    for position, (step, state_a, state_b) in enumerate(zip(steps, sequence_a, sequence_b, strict=True)):
        own = tool.match(state_a, state_b)
        for alignment, moved in (("none", state_b), ("final", tool.permute(final, state_b)),
                                 ("own", tool.permute(own, state_b))):
            rows.append(make_row(part, tool, seed, step, densities[position], "pair", alignment,
                                 tool.pair(state_a, moved)))
        print(f"{part} seed {seed} step {step}: " + ", ".join(f"{r.alignment} {r.loss_barrier:.3f}"
                                                            for r in rows[-3:]), flush=True)
    return rows


def run_trajectory(args: argparse.Namespace, data: Data, seed: int) -> list[Row]:
    """Part (ii): the final models' permutation along the training trajectory (checkpoints at the init, after
    `--early-steps` optimizer steps and at the end of every epoch; the step column counts optimizer steps)."""
    tool = Connectivity(args.model, args.sequence_width, data)
    steps_per_epoch = -(-len(data.x_train) // 64)
    last = args.epochs * steps_per_epoch
    steps = sorted({s for s in args.early_steps if 0 < s < last} | {e * steps_per_epoch for e in range(1, args.epochs)}
                   | {last})
    sequences = []
    for index in range(2):
        model = build_model(args.model, data.input_shape, 10, seed=1000 * seed + index, width=args.sequence_width)
        initial = snapshot(model)
        sequences.append([initial] + train_epochs(model, data.x_train, data.y_train, epochs=args.epochs, lr=args.lr,
                                                  seed=1000 * seed + 100 + index, snapshot_steps=steps))
    return aligned_sequence("trajectory", tool, seed, sequences[0], sequences[1], [0, *steps],
                            [1.0] * len(sequences[0]))


def run_imp(args: argparse.Namespace, data: Data, seed: int) -> list[Row]:
    """Part (iii): the last IMP level's permutation along the pruning levels."""
    tool = Connectivity(args.model, args.sequence_width, data)
    runs = []
    for index in range(2):
        model = build_model(args.model, data.input_shape, 10, seed=1000 * seed + index, width=args.sequence_width)
        runs.append(iterative_magnitude_pruning(model, data, epochs=args.epochs, rewind_epoch=args.rewind_epoch,
                                                levels=args.levels, fraction=args.prune_fraction, lr=args.lr,
                                                seed=1000 * seed + 100 + index))
    densities = [mask_density(masks) for masks in runs[0].masks]
    return aligned_sequence("imp", tool, seed, runs[0].states, runs[1].states, list(range(len(densities))), densities)


METRICS = {  # Row field: (label, decimals)
    "loss_barrier": ("loss barrier (nats)", 3),
    "accuracy_barrier": ("accuracy barrier (points)", 1),
    "loss_gap": ("signed interior loss gap (nats)", 3),
}


@dataclass(frozen=True)
class Summary:
    """Mean and sd over seeds of every metric of one (part, step, comparison, alignment) cell."""

    part: str
    step: int
    density: float
    comparison: str
    alignment: str
    mean: dict[str, float]
    sd: dict[str, float]
    endpoint_accuracy: float
    seeds: int


def summarize(rows: Sequence[Row]) -> list[Summary]:
    """Aggregate rows over seeds, keeping the first-seen order of the cells."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.part, row.step, row.comparison, row.alignment), []).append(row)
    table = []
    for (part, step, comparison, alignment), members in groups.items():
        values = {metric: [getattr(r, metric) for r in members] for metric in METRICS}
        table.append(Summary(part, step, statistics.mean(r.density for r in members), comparison, alignment,
                             {metric: statistics.mean(v) for metric, v in values.items()},
                             {metric: statistics.stdev(v) if len(v) > 1 else 0.0 for metric, v in values.items()},
                             statistics.mean(r.endpoint_accuracy for r in members), len(members)))
    return table


STEP_LABEL = {"width": "width", "trajectory": "optimizer step", "imp": "level (density)"}


def markdown_tables(table: Sequence[Summary]) -> str:
    """Per part and metric one Markdown table: rows are steps, columns are comparison/alignment (mean ± sd)."""
    blocks = []
    for part in PARTS:
        cells = [s for s in table if s.part == part]
        if not cells:
            continue
        columns = list(dict.fromkeys((s.comparison, s.alignment) for s in cells))
        steps = list(dict.fromkeys(s.step for s in cells))
        header = [STEP_LABEL[part], "endpoint acc %"] + [f"{c}/{a}" for c, a in columns]
        for metric, (label, decimals) in METRICS.items():
            lines = [f"#### {part}: {label}, mean ± sd over {cells[0].seeds} seeds", "",
                     "| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * len(columns)]
            for step in steps:
                by_column = {(s.comparison, s.alignment): s for s in cells if s.step == step}
                first = by_column[columns[0]]
                name = {"width": f"x{step}", "imp": f"{step} ({first.density:.3f})"}.get(part, str(step))
                values = [f"{by_column[c].mean[metric]:.{decimals}f} ± {by_column[c].sd[metric]:.{decimals}f}"
                          for c in columns]
                lines.append("| " + " | ".join([name, f"{first.endpoint_accuracy:.1f}"] + values) + " |")
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot(table: Sequence[Summary], out: Path) -> None:
    """One PNG per part: each metric vs step, one line per comparison/alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for part in PARTS:
        cells = [s for s in table if s.part == part]
        if not cells:
            continue
        figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
        for column in dict.fromkeys((s.comparison, s.alignment) for s in cells):
            line = [s for s in cells if (s.comparison, s.alignment) == column]
            steps = [s.step for s in line]
            for axis, metric in zip(axes, METRICS, strict=True):
                axis.errorbar(steps, [s.mean[metric] for s in line], yerr=[s.sd[metric] for s in line],
                              marker="o", capsize=3, label=f"{column[0]} / {column[1]}")
        for axis, (label, _) in zip(axes, METRICS.values(), strict=True):
            axis.set_xlabel(STEP_LABEL[part])
            axis.set_ylabel(label)
            axis.axhline(0, color="grey", linewidth=0.5)
            if part == "width":
                axis.set_xscale("log", base=2)
            elif part == "trajectory":
                axis.set_xscale("symlog", linthresh=1)
                axis.set_xlim(left=0)
        axes[0].legend(fontsize=8)
        figure.suptitle(f"{part}: {cells[0].seeds} seeds, measured on the test subset")
        figure.tight_layout()
        figure.savefig(out / f"{part}.png", dpi=120)
        plt.close(figure)


def write_outputs(rows: Sequence[Row], out: Path, header: str) -> str:
    """CSV of every row, summary.md, PNGs; returns the Markdown tables."""
    out.mkdir(parents=True, exist_ok=True)
    fields = list(Row.__dataclass_fields__)
    with (out / "connectivity.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([f"{value:.5f}" if isinstance(value, float) else value
                             for value in (getattr(row, field) for field in fields)])
    table = summarize(rows)
    markdown = markdown_tables(table)
    (out / "summary.md").write_text(header + "\n\n" + markdown + "\n")
    plot(table, out)
    return markdown


def main() -> None:
    """Run the selected parts over the seeds, write the outputs and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--sequence-width", type=int, default=1, help="width of the trajectory and IMP models")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--early-steps", type=int, nargs="*", default=[2, 5, 10, 20, 40],
                        help="trajectory checkpoints (optimizer steps) before the first epoch ends")
    parser.add_argument("--rewind-epoch", type=int, default=1)
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--prune-fraction", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_connectivity")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, wall = time.process_time(), time.time()
    runners = {"width": run_width, "trajectory": run_trajectory, "imp": run_imp}
    rows: list[Row] = []
    for seed in range(args.seeds):
        data = load_data(args.train_size, args.test_size, seed)
        for part in args.parts:
            rows += runners[part](args, data, seed)
        # outputs after every seed, so that an interrupted run still leaves its finished seeds
        settings = [f"{args.model}, Fashion-MNIST {args.train_size} train / {args.test_size} test",
                    f"{args.epochs} epochs", f"lr {args.lr}", f"seeds 0..{seed} of {args.seeds}"]
        if "width" in args.parts:
            settings.append(f"widths {args.widths}")
        if "trajectory" in args.parts or "imp" in args.parts:
            settings.append(f"sequence width x{args.sequence_width}")
        if "imp" in args.parts:
            settings.append(f"IMP {args.levels} levels of {args.prune_fraction:g} with rewind to epoch "
                            f"{args.rewind_epoch}")
        header = (f"Settings: {', '.join(settings)}; parts {' '.join(args.parts)}; CPU seconds "
                  f"{time.process_time() - started:.0f}, wall seconds {time.time() - wall:.0f}.")
        markdown = write_outputs(rows, args.out, header)
    print(markdown)
    print(header)
    print(f"outputs in {args.out}")


if __name__ == "__main__":
    main()
