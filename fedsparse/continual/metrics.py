"""Continual-learning metrics over the accuracy matrix, and its CSV / heat-map output.

R is a T x T array: R[i, j] = accuracy on task j's test set after training on tasks 0..i (row i is measured right
after task i; entries above the diagonal are accuracies on tasks not trained on yet). With T tasks:

- average accuracy   A = (1/T) sum_j R[T-1, j]                                  (final model on all tasks)
- average forgetting F = (1/(T-1)) sum_{j<T-1} (max_{j<=i<T-1} R[i, j] - R[T-1, j])   (Chaudhry et al. 2018)
- backward transfer  BWT = (1/(T-1)) sum_{j<T-1} (R[T-1, j] - R[j, j])           (Lopez-Paz & Ranzato 2017)

F and BWT are 0 for a single task (nothing to forget). Accuracies are fractions in [0, 1]. Entries above the
diagonal may be NaN (a federated run evaluates only the tasks seen so far); none of the metrics reads them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {matrix.shape}")
    if np.isnan(matrix[np.tril_indices(len(matrix))]).any():
        raise ValueError("the accuracy matrix has missing entries on or below the diagonal")
    return matrix


def average_accuracy(matrix: np.ndarray) -> float:
    """Mean of the last row: the final model's accuracy averaged over all tasks."""
    matrix = _check_matrix(matrix)
    return float(matrix[-1].mean())


def average_forgetting(matrix: np.ndarray) -> float:
    """Mean over tasks j < T-1 of (best accuracy on j before the last task) - (final accuracy on j)."""
    matrix = _check_matrix(matrix)
    tasks = len(matrix)
    if tasks == 1:
        return 0.0
    drops = [matrix[j:tasks - 1, j].max() - matrix[-1, j] for j in range(tasks - 1)]
    return float(np.mean(drops))


def backward_transfer(matrix: np.ndarray) -> float:
    """Mean over tasks j < T-1 of (final accuracy on j) - (accuracy on j right after learning it)."""
    matrix = _check_matrix(matrix)
    tasks = len(matrix)
    if tasks == 1:
        return 0.0
    return float(np.mean([matrix[-1, j] - matrix[j, j] for j in range(tasks - 1)]))


@dataclass(frozen=True)
class ContinualSummary:
    """The three scalar metrics of one accuracy matrix."""

    average_accuracy: float
    average_forgetting: float
    backward_transfer: float


def summarize(matrix: np.ndarray) -> ContinualSummary:
    """Average accuracy, average forgetting and backward transfer of `matrix`."""
    return ContinualSummary(average_accuracy(matrix), average_forgetting(matrix), backward_transfer(matrix))


def write_matrix_csv(path: str | Path, matrix: np.ndarray, task_names: Sequence[str]) -> Path:
    """Write R as CSV: a header `after_task,<task names...>`, then one row per training stage."""
    matrix = _check_matrix(matrix)
    if len(task_names) != len(matrix):
        raise ValueError(f"{len(task_names)} task names for a {len(matrix)}-task matrix")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["after_task", *task_names])
        for name, row in zip(task_names, matrix, strict=True):
            writer.writerow([name, *(f"{value:.6f}" for value in row)])
    return path


def read_matrix_csv(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read back what `write_matrix_csv` wrote: (matrix, task names)."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.reader(handle))
    names = rows[0][1:]
    return np.array([[float(value) for value in row[1:]] for row in rows[1:]]), names


def plot_matrix(path: str | Path, matrix: np.ndarray, task_names: Sequence[str], *, title: str = "") -> Path:
    """Save R as an annotated heat map (rows: after task i; columns: evaluated on task j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = _check_matrix(matrix)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 1.2 + 0.9 * len(matrix)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(len(matrix)):
        for j in range(len(matrix)):
            if not np.isnan(matrix[i, j]):  # NaN: a task not evaluated after task i (j > i in a federated run)
                axes.text(j, i, f"{100 * matrix[i, j]:.0f}", ha="center", va="center",
                          color="white" if matrix[i, j] < 0.6 else "black", fontsize=8)
    axes.set_xticks(range(len(matrix)), task_names, rotation=45, ha="right", fontsize=7)
    axes.set_yticks(range(len(matrix)), task_names, fontsize=7)
    axes.set_xlabel("evaluated on task j")
    axes.set_ylabel("after training on task i")
    summary = summarize(matrix)
    axes.set_title(f"{title}\nACC {100 * summary.average_accuracy:.1f}  FGT {100 * summary.average_forgetting:.1f}"
                   f"  BWT {100 * summary.backward_transfer:.1f}", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
