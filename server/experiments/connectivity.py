"""The connectivity experiment: K clients train their own models side by side; the server keeps their trajectories
and measures linear mode connectivity between them, before and after permutation alignment.

`ConnectivityExperiment(cfg)` (registered as EXPERIMENTS["connectivity"]) has one `Phase` of `num-rounds` rounds of
a `TrajectoryStrategy`: FedAvg whose train messages are `train.connectivity` (`client.connectivity`): client i
trains its own model, from its own seed, for `local-epochs` epochs per round, on the whole training set
(`conn.data = full`) or on its partition (`partition`). Nothing is averaged: after every round the server reads
every client's model back (received model + update) and keeps it (the trajectory); the global model it sends and
evaluates (rounds.csv's `test_accuracy`) is client 0's model. The models' own norms differ, so the update-norm
screen is off for this strategy.

At the end (`finish`), as the trajectory alignment of Sharma et al. (arXiv:2404.06498): every client k >= 1 is
weight-matched onto client 0 at the last round (`fedsparse.alignment.weight_matching`), and the one permutation
found is applied to all of client k's checkpoints (round 0 = its initial model, then every round). For every
round and every k, the loss and accuracy barriers between client 0 and client k along linear interpolation
(`conn.points` points, on the first `conn.eval-examples` test examples) are measured plain, aligned, and aligned
with REPAIR at every interior point (`conn.repair`; the interpolated model's per-channel statistics at every hidden
Linear/Conv output rescaled to the interpolation of the endpoints', on `conn.calibration-examples` training
examples). A model with BatchNorm has its running statistics re-estimated at every point. With K >= 3, the 3-way
barrier of clients 0, 1, 2 over the simplex grid (`conn.simplex-resolution`) at the last round, plain and aligned.

Outputs: `trajectory.csv` (one row per round and client k >= 1: the barriers and both endpoints' test loss and
accuracy), `trajectory.png` (barriers vs round, plain vs aligned vs REPAIR), and summary.json entries (see
`finish`).

Invariants: the trajectory is in `state_dict()`, so a run resumed after any round reports the same summary (the
checkpoint holds K x rounds models: mind it for large models); an aligned checkpoint computes the same function as
the checkpoint (a permutation of hidden units); a client whose reply was rejected in a round has no checkpoint
that round (logged) and no row for it.
"""

from __future__ import annotations

import copy
import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from client.connectivity import TRAIN_MESSAGE, own_init_state, training_data
from client.merging import calibration_batches, tact_layers
from fedsparse.alignment import (
    SPEC_BUILDERS,
    BarrierResult,
    Evaluation,
    Evaluator,
    Permutation,
    apply_permutation,
    dataset_evaluator,
    linear_barrier,
    permutation_spec,
    repair,
    reset_batchnorm_statistics,
    simplex_barrier,
    weight_matching,
)
from fedsparse.config import ConfigError
from fedsparse.data import load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.train import pick_device
from server.experiments import Phase, PhaseContext, TestSetEvaluator
from server.experiments.merging import ExpertStrategy

log = logging.getLogger("fedsparse")

StateDict = dict[str, torch.Tensor]
TRAJECTORY_CSV = "trajectory.csv"
TRAJECTORY_PNG = "trajectory.png"
VARIANTS = ("plain", "aligned", "repair")


class TrajectoryStrategy(ExpertStrategy):
    """`ExpertStrategy` (the round's client models in `experts`) whose train messages are `train.connectivity`."""

    message_type = TRAIN_MESSAGE


@dataclass(frozen=True)
class PairBarriers:
    """Barriers between client 0 and client `client` at one round: plain, aligned (client's checkpoint permuted by
    the final-round alignment) and aligned + REPAIR (None when `conn.repair` is off)."""

    round: int
    client: int
    plain: BarrierResult
    aligned: BarrierResult
    repaired: BarrierResult | None

    def row(self) -> dict[str, float | int]:
        """One trajectory.csv row: the barriers of each variant measured (no REPAIR columns without it) and the
        endpoints' loss and accuracy."""
        first, last = self.plain.evaluations[0], self.plain.evaluations[-1]
        row: dict[str, float | int] = {"round": self.round, "client": self.client}
        for variant, result in zip(VARIANTS, (self.plain, self.aligned, self.repaired), strict=True):
            if result is not None:
                row[f"loss_barrier_{variant}"] = result.loss_barrier
                row[f"accuracy_barrier_{variant}"] = result.accuracy_barrier
        row.update({"loss_0": first.loss, "accuracy_0": first.accuracy, "loss_client": last.loss,
                    "accuracy_client": last.accuracy})
        return row


def barrier_of(evaluations: Sequence[Evaluation], weights: Sequence[tuple[float, ...]]) -> BarrierResult:
    """The loss and accuracy barriers of evaluations along a 2-model line (weights `(1 - alpha, alpha)`, ends
    included): max over the points of the gap to the line between the ends (>= 0: the ends give 0)."""
    first, last = evaluations[0], evaluations[-1]
    loss_barrier = accuracy_barrier = 0.0
    for (weight_a, weight_b), evaluation in zip(weights, evaluations, strict=True):
        loss_barrier = max(loss_barrier, evaluation.loss - (weight_a * first.loss + weight_b * last.loss))
        accuracy_barrier = max(accuracy_barrier,
                               weight_a * first.accuracy + weight_b * last.accuracy - evaluation.accuracy)
    return BarrierResult(tuple(weights), tuple(evaluations), loss_barrier, accuracy_barrier)


def repaired_barrier(model: nn.Module, state_a: StateDict, state_b: StateDict, evaluate: Evaluator,
                     layers: Sequence[str], batches: Sequence[torch.Tensor], num_points: int = 11) -> BarrierResult:
    """Barriers along `(1 - alpha) a + alpha b` where every interior point is REPAIRed at `layers` on `batches`
    (`fedsparse.alignment.repair`; b already aligned to a); the ends are the models themselves. `model` (the
    architecture) is not modified."""
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    model_a, model_b = copy.deepcopy(model), copy.deepcopy(model)
    model_a.load_state_dict(state_a)
    model_b.load_state_dict(state_b)
    alphas = [index / (num_points - 1) for index in range(num_points)]
    evaluations = []
    for alpha in alphas:
        if alpha == 0.0:
            evaluations.append(evaluate(model_a))
        elif alpha == 1.0:
            evaluations.append(evaluate(model_b))
        else:
            evaluations.append(evaluate(repair(model_a, model_b, alpha, layers, batches).model))
    return barrier_of(evaluations, [(1.0 - alpha, alpha) for alpha in alphas])


class ConnectivityExperiment:
    """The phase of a connectivity run and the clients' trajectories (see the module docstring)."""

    config_namespaces: frozenset[str] = frozenset({"conn"})

    def __init__(self, cfg: dict) -> None:
        self.check_config(cfg)
        self.cfg = cfg
        self.data = load_dataset(cfg["dataset"], cfg["data-root"])
        self.device = pick_device(cfg["device"])
        self.model: nn.Module = build_model(cfg["model"], self.data.input_shape, self.data.num_classes,
                                            seed=cfg["seed"])
        maskable = list(maskable_names(self.model, tuple(cfg["sparse.mask-layers"].split(","))))
        self.strategy = TrajectoryStrategy.from_config(cfg, maskable)
        self.strategy.max_update_norm_ratio = 0.0  # an update is a whole model minus client 0's: no common scale
        self.strategy.max_examples = len(self.data.y_train)
        self.trajectory: dict[int, dict[int, StateDict]] = {}  # round -> partition -> that client's model
        evaluator = TestSetEvaluator(cfg["dataset"], self.data.x_test, self.data.y_test, self.device)
        self.phases = [Phase(name="trajectories", task=cfg["dataset"], rounds=cfg["num-rounds"],
                             strategy=self.strategy, evaluators=[evaluator], after_round=self.after_round)]

    @staticmethod
    def check_config(cfg: dict) -> None:
        """ConfigError naming the key when the settings cannot host a connectivity run: a strategy other than
        fedavg, fraction-train below 1, fewer than 2 clients, a model without a permutation spec."""
        if cfg["strategy"] != "fedavg":
            raise ConfigError(f"config key 'strategy': the connectivity experiment runs fedavg (its messages carry "
                              f"dense models), got {cfg['strategy']!r}")
        if cfg["fraction-train"] != 1.0:
            raise ConfigError("config key 'fraction-train': every client trains its model in every round: set 1.0 "
                              f"(got {cfg['fraction-train']})")
        if cfg["num-clients"] < 2:
            raise ConfigError(f"config key 'num-clients': connectivity needs at least 2 clients (models to connect), "
                              f"got {cfg['num-clients']}")
        if cfg["model"] not in SPEC_BUILDERS:
            raise ConfigError(f"config key 'model': no permutation spec for model {cfg['model']!r} to align with "
                              f"(known: {', '.join(SPEC_BUILDERS)})")

    # ------------------------------------------------------------------------------------------- rounds

    def after_round(self, ctx: PhaseContext, phase_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Keep every client's model of this round; the next global model is client 0's (nothing is averaged)."""
        models = self.strategy.experts
        missing = [p for p in range(self.cfg["num-clients"]) if p not in models]
        if missing:
            log.warning("round %d: no model from partitions %s: no checkpoint of theirs this round", phase_round,
                        missing)
        self.trajectory[phase_round] = {p: {k: v.detach().clone() for k, v in state.items()}
                                        for p, state in models.items()}
        if 0 not in models:
            return arrays
        return ArrayRecord(self.trajectory[phase_round][0])

    # ---------------------------------------------------------------------------------------- alignment

    def checkpoints(self) -> dict[int, dict[int, StateDict]]:
        """Every client's checkpoints: round 0 (the clients' own initial models, rebuilt here) and every round run."""
        initial = {p: own_init_state(self.cfg, p) for p in range(self.cfg["num-clients"])}
        return {0: initial, **self.trajectory}

    def alignment(self) -> dict[int, Permutation]:
        """For every client k >= 1 with a model at the last round: the permutation that weight-matches its last
        model onto client 0's ({} when client 0 has none)."""
        if not self.trajectory:
            return {}
        last = self.trajectory[max(self.trajectory)]
        if 0 not in last:
            log.warning("client 0 has no model at the last round: nothing to align to")
            return {}
        spec = permutation_spec(self.cfg["model"], self.model)
        return {p: weight_matching(spec, last[0], state, seed=self.cfg["seed"]).permutation
                for p, state in sorted(last.items()) if p != 0}

    def aligned_checkpoints(self, permutations: dict[int, Permutation]) -> dict[int, dict[int, StateDict]]:
        """`checkpoints()` with client k's every checkpoint permuted by `permutations[k]` (client 0's and those of
        clients without a permutation unchanged)."""
        spec = permutation_spec(self.cfg["model"], self.model)
        return {round_: {p: apply_permutation(spec, permutations[p], state) if p in permutations else state
                         for p, state in models.items()}
                for round_, models in self.checkpoints().items()}

    # ------------------------------------------------------------------------------------------ barriers

    def evaluator(self) -> Evaluator:
        """Loss and accuracy on the first `conn.eval-examples` test examples."""
        keep = self.cfg["conn.eval-examples"] or None
        return dataset_evaluator(self.data.x_test[:keep], self.data.y_test[:keep])

    def calibration(self) -> list[torch.Tensor]:
        """The REPAIR / BatchNorm-reset batches: the first `conn.calibration-examples` of client 0's training data."""
        x, _ = training_data(self.cfg, 0)
        return calibration_batches(x, self.cfg["conn.calibration-examples"])

    def statistics_reset(self, batches: list[torch.Tensor]) -> Callable[[nn.Module], None] | None:
        """Re-estimation of BatchNorm running statistics at every interpolation point, for a model that has them."""
        if not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in self.model.modules()):
            return None
        return lambda model: reset_batchnorm_statistics(model, batches)

    def pair_barriers(self, permutations: dict[int, Permutation]) -> list[PairBarriers]:
        """Client 0 vs every client k of `permutations` (`alignment()`) at every checkpoint round, plain / aligned /
        aligned + REPAIR."""
        plain, aligned = self.checkpoints(), self.aligned_checkpoints(permutations)
        evaluate, batches = self.evaluator(), self.calibration()
        reset = self.statistics_reset(batches)
        points, layers = self.cfg["conn.points"], tact_layers(self.model)
        found = []
        for round_ in sorted(plain):
            if 0 not in plain[round_]:
                continue
            for client in sorted(permutations):
                if client not in plain[round_]:
                    continue
                reference = plain[round_][0]
                repaired = None
                if self.cfg["conn.repair"]:
                    repaired = repaired_barrier(self.model, reference, aligned[round_][client], evaluate, layers,
                                                batches, points)
                found.append(PairBarriers(
                    round_, client,
                    linear_barrier(self.model, reference, plain[round_][client], evaluate, points, reset),
                    linear_barrier(self.model, reference, aligned[round_][client], evaluate, points, reset),
                    repaired))
        return found

    def simplex_barriers(self, permutations: dict[int, Permutation]) -> dict[str, float]:
        """3-way barriers of clients 0, 1, 2 at the last round, plain and aligned by `permutations` ({} unless
        the three have a model at the last round)."""
        if not self.trajectory:
            return {}
        last_round = max(self.trajectory)
        if not {0, 1, 2} <= set(self.trajectory[last_round]) or not {1, 2} <= set(permutations):
            return {}
        aligned = self.aligned_checkpoints(permutations)[last_round]
        evaluate = self.evaluator()
        reset = self.statistics_reset(self.calibration())
        resolution = self.cfg["conn.simplex-resolution"]
        result = {}
        for variant, states in (("plain", self.trajectory[last_round]), ("aligned", aligned)):
            barrier = simplex_barrier(self.model, [states[p] for p in (0, 1, 2)], evaluate, resolution, reset)
            result[f"loss_barrier_{variant}"] = barrier.loss_barrier
            result[f"accuracy_barrier_{variant}"] = barrier.accuracy_barrier
        return result

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The trajectory: every client's model after every round so far."""
        return {"trajectory": {round_: dict(models) for round_, models in self.trajectory.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        self.trajectory = {int(round_): {int(p): {k: v.clone() for k, v in model.items()} for p, model in models.items()}
                           for round_, models in state.get("trajectory", {}).items()}

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """Write trajectory.csv and trajectory.png; return the summary entries: `conn_final_barriers` (per client
        k at the last round, every variant), their mean over clients `conn_final_barriers_mean`, `conn_simplex`
        (K >= 3), and the last-round test accuracy of every client on the barrier examples."""
        if not self.trajectory:
            return {}
        permutations = self.alignment()
        pairs = self.pair_barriers(permutations)
        table = [pair.row() for pair in pairs]
        write_trajectory_csv(out_dir / TRAJECTORY_CSV, table)
        plot_trajectory(out_dir / TRAJECTORY_PNG, table, title=f"{self.cfg['model']} on {self.cfg['dataset']}, "
                                                                 f"{self.cfg['num-clients']} clients")
        last_round = max(self.trajectory)
        final = {f"client-{row['client']}": {k: v for k, v in row.items() if "barrier" in k}
                 for row in table if row["round"] == last_round}
        mean = {key: float(np.mean([values[key] for values in final.values()]))
                for key in next(iter(final.values()), {})}
        evaluate = self.evaluator()
        accuracy = {}
        for partition, state in sorted(self.trajectory[last_round].items()):
            work = copy.deepcopy(self.model)
            work.load_state_dict(state)
            accuracy[f"client-{partition}"] = evaluate(work).accuracy
        extra: dict = {"conn_data": self.cfg["conn.data"], "conn_rounds": last_round,
                       "conn_client_accuracy": accuracy, "conn_final_barriers": final,
                       "conn_final_barriers_mean": mean, "conn_trajectory": TRAJECTORY_CSV}
        simplex = self.simplex_barriers(permutations)
        if simplex:
            extra["conn_simplex"] = simplex
        return extra


def write_trajectory_csv(path: Path, table: list[dict]) -> None:
    """trajectory.csv: one row per round and client k >= 1 (`PairBarriers.row`)."""
    if not table:
        path.write_text("")
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def plot_trajectory(path: Path, table: list[dict], title: str) -> None:
    """Loss and accuracy barrier vs round, one line per client k and variant (plain dashed, aligned solid, REPAIR
    dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"plain": "--", "aligned": "-", "repair": ":"}
    clients = sorted({row["client"] for row in table})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, metric, label in ((axes[0], "loss_barrier", "loss barrier"),
                                (axes[1], "accuracy_barrier", "accuracy barrier")):
        for index, client in enumerate(clients):
            rows = [row for row in table if row["client"] == client]
            for variant, style in styles.items():
                if f"{metric}_{variant}" not in rows[0]:
                    continue
                values = [row[f"{metric}_{variant}"] for row in rows]
                axis.plot([row["round"] for row in rows], values, style, marker="o", markersize=3,
                          color=colours[index % len(colours)], label=f"0 vs {client}, {variant}")
        axis.set_xlabel("round (0 = initial models)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
