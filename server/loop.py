"""The runner: an experiment's phases, round after round, with central evaluation, results and checkpoints.

`run_federation(grid, run_config)` resolves the config, builds the experiment named by `experiment`
(`server.experiments.EXPERIMENTS`), wraps the grid in a `CountingGrid` and runs every phase (see
`server.experiments` for the hook order). Each round: the phase's strategy configures the train messages
(discovering nodes and running its one-off exchanges through the counting grid), the runner sends them, the
strategy aggregates the replies, the phase's `after_round` hook may move the global model, the evaluators score it,
and a row goes to rounds.csv and the checkpoint is written.

Invariants:
- Bytes: a round's `bytes_down` / `bytes_up` are the serialized bytes of every message of a non-`query.*` type
  sent during that round; everything of type `query.*` (discovery, saliency, mask install, a phase's one-off
  exchanges) is one-off traffic, summed in summary.json's `bytes_oneoff`.
- Resume: a run killed after round k and started again with `resume=true` continues with round k+1 of the same
  phase (strategy and experiment states restored from the checkpoint) and ends with the same model as an
  uninterrupted run.
- Evaluation: the evaluators score the global model every `eval-every`-th round of a phase and always at a phase's
  last round; the other rounds' rows carry NaN test metrics (empty cells in rounds.csv). Skipping an evaluation
  never changes the training: the model after round k is the same for every `eval-every`.
- A round whose every reply was rejected, whose aggregated train loss is not finite, or (on an evaluated round)
  whose global model gives a non-finite test loss, stops the run with `TrainingFailed`; the checkpoint of the last
  good round stays.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedsparse import results
from fedsparse.config import resolve
from fedsparse.resume import load_for_resume
from fedsparse.simulation import check_run_settings
from server.experiments import EXPERIMENTS, Experiment, Phase, PhaseContext
from server.grid import Bytes, CountingGrid

log = logging.getLogger("fedsparse")
CHECKPOINT = "checkpoint.pt"


class TrainingFailed(RuntimeError):
    """The run could not train: every reply of a round was rejected, or the global model became unusable.
    The checkpoint of the last good round stays, so the run can be resumed once the cause is fixed."""


def progress(cfg: dict, row: dict, total_rounds: int) -> None:
    """One line per round on stderr ("acc -  loss -" on a round that was not evaluated)."""
    evaluated = math.isfinite(row["test_accuracy"])
    accuracy = f"{100 * row['test_accuracy']:.2f}%" if evaluated else "-"
    loss = f"{row['test_loss']:.4f}" if evaluated else "-"
    print(f"[fedsparse] round {int(row['round'])}/{total_rounds}  acc {accuracy}  "
          f"loss {loss}  down {row['bytes_down'] / 1e6:.3f} MB  up {row['bytes_up'] / 1e6:.3f} MB"
          f"  clients {row['clients']}  rejected {row['rejected']}  {row['seconds']:.1f} s",
          file=sys.stderr, flush=True)


def evaluate(phase: Phase, model: torch.nn.Module, arrays: ArrayRecord) -> dict[str, float]:
    """Every evaluator's metrics of the global model, plus `test_accuracy` / `test_loss`: the first evaluator's
    first "acc/" and "loss/" metrics."""
    model.load_state_dict(arrays.to_torch_state_dict())
    metrics: dict[str, float] = {}
    first: dict[str, float] = {}
    for index, evaluator in enumerate(phase.evaluators):
        got = evaluator(model)
        if index == 0:
            first = got
        metrics.update(got)
    accuracy = next((v for k, v in first.items() if k.startswith("acc/")), None)
    loss = next((v for k, v in first.items() if k.startswith("loss/")), None)
    if accuracy is None or loss is None:
        raise ValueError(f"phase {phase.name!r}: the first evaluator must return an 'acc/...' and a 'loss/...' "
                         f"metric, got {sorted(first)}")
    return {"test_loss": loss, "test_accuracy": accuracy, **metrics}


def phase_summaries(phases: list[Phase], rows: list[dict]) -> list[dict]:
    """Per phase that ran: its name, task, rounds done, bytes and the metrics of its last round."""
    out = []
    for phase in phases:
        mine = [r for r in rows if r.get("phase", phases[0].name) == phase.name]
        if not mine:
            continue
        last = mine[-1]
        metric_names = ["test_accuracy", "test_loss"] + [k for k in last if "/" in k]
        out.append({"name": phase.name, "task": phase.task, "rounds": len(mine),
                    "bytes_down": sum(r["bytes_down"] for r in mine), "bytes_up": sum(r["bytes_up"] for r in mine),
                    "final": {k: last[k] for k in metric_names}})
    return out


def initial_model(experiment: Experiment, cfg: dict) -> torch.nn.Module:
    """The experiment's `model` when it has one, else `cfg["model"]` built for `cfg["dataset"]`."""
    model = getattr(experiment, "model", None)
    if model is not None:
        return model
    from fedsparse.data import load_dataset
    from fedsparse.models import build_model

    data = load_dataset(cfg["dataset"], cfg["data-root"])
    return build_model(cfg["model"], data.input_shape, data.num_classes, seed=cfg["seed"])


def is_evaluated(phase_round: int, phase_rounds: int, eval_every: int) -> bool:
    """Whether the runner evaluates the global model after round `phase_round` (1-based, within its phase): every
    `eval_every`-th round and always the phase's last one."""
    if eval_every < 1:
        raise ValueError(f"eval-every must be >= 1, got {eval_every}")
    return phase_round % eval_every == 0 or phase_round == phase_rounds


NOT_EVALUATED = {"test_loss": math.nan, "test_accuracy": math.nan}  # a row's test metrics when it was not evaluated


def phase_of_round(phases: list[Phase], server_round: int) -> tuple[int, int]:
    """(phase index, round within that phase) of a global round number (1-based)."""
    offset = 0
    for index, phase in enumerate(phases):
        if server_round <= offset + phase.rounds:
            return index, server_round - offset
        offset += phase.rounds
    raise ValueError(f"round {server_round} is past the experiment's {offset} rounds")


def run_federation(grid, run_config: dict) -> dict:
    """Run every phase of the configured experiment; returns the summary (also written to summary.json)."""
    cfg = resolve(run_config)
    check_run_settings(cfg)  # under `flwr run` nothing has checked the split, the mask layers or the density yet
    out = Path(cfg["output-dir"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    # a damaged checkpoint or a refused change of settings raises ResumeError naming the file or the keys
    ckpt = load_for_resume({**cfg, "output-dir": str(out)}) if cfg["resume"] else None
    if cfg["resume"] and ckpt is None:
        log.warning("resume=true but %s does not exist: starting from round 1", ckpt_path)
    results.write_json(out / "config.json", {**cfg, "resume": False})

    experiment = EXPERIMENTS[cfg["experiment"]](cfg)
    phases = experiment.phases
    total_rounds = sum(p.rounds for p in phases)
    model = initial_model(experiment, cfg)
    counting = grid if isinstance(grid, CountingGrid) else CountingGrid(grid)
    arrays = ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items()})
    rows: list[dict] = []
    failures: list[dict] = []
    oneoff_before = Bytes()  # one-off bytes of the run before this process (resume)
    if ckpt is not None:
        arrays, rows, failures = ArrayRecord(ckpt.state), ckpt.rows, ckpt.failures
        oneoff_before = Bytes(ckpt.oneoff["down"], ckpt.oneoff["up"])
        experiment.load_state_dict(ckpt.experiment)
        if rows:  # the strategy state saved belongs to the phase of the last round done
            index, _ = phase_of_round(phases, min(len(rows), total_rounds))
            phases[index].strategy.bind(arrays)
            phases[index].strategy.load_state_dict(ckpt.strategy)
        log.info("resuming %s after round %d", out, len(rows))

    offset = 0
    for index, phase in enumerate(phases):
        done = len(rows) - offset  # rounds of this phase already done
        offset += phase.rounds
        if done >= phase.rounds:
            continue
        strategy = phase.strategy
        strategy.bind(arrays)
        ctx = PhaseContext(grid=counting, cfg=cfg, model=model, arrays=arrays, nodes=strategy.discover(counting),
                           phase_index=index, out_dir=out, phase=phase, timeout=cfg["round-timeout"])
        if done == 0 and phase.on_start is not None:
            phase.on_start(ctx)
            arrays = ctx.arrays
        extra = dict(phase.client_config)
        if phase.task != cfg["dataset"]:
            extra.setdefault("task", phase.task)
        for phase_round in range(done + 1, phase.rounds + 1):
            server_round = offset - phase.rounds + phase_round
            start = time.perf_counter()
            before = counting.rounds()
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(extra)), counting))
            received = list(counting.send_and_receive(messages, timeout=cfg["round-timeout"])) if messages else []
            new_arrays, metrics = strategy.aggregate_train(server_round, received)
            new_failures = strategy.failures.take()
            for failure in new_failures:
                failure.setdefault("round", server_round)
            failures.extend(new_failures)
            if new_arrays is None:
                raise TrainingFailed(f"round {server_round}: none of the {len(messages)} train replies was "
                                     f"accepted (see the failures logged above); the run cannot train. The "
                                     f"checkpoint of round {server_round - 1} stays in {out}")
            arrays = new_arrays
            if phase.after_round is not None:
                ctx.arrays, ctx.nodes = arrays, strategy.roster.partitions()
                arrays = phase.after_round(ctx, phase_round, arrays)
            traffic = counting.rounds() - before
            if not math.isfinite(metrics["train_loss"]):
                raise TrainingFailed(f"round {server_round}: the clients' aggregated train loss is "
                                     f"{metrics['train_loss']}: the model is diverging. The checkpoint of round "
                                     f"{server_round - 1} stays in {out}")
            evaluated = is_evaluated(phase_round, phase.rounds, cfg["eval-every"])
            scores = evaluate(phase, model, arrays) if evaluated else dict(NOT_EVALUATED)
            if evaluated and not math.isfinite(scores["test_loss"]):
                raise TrainingFailed(f"round {server_round}: the global model gives a test loss of "
                                     f"{scores['test_loss']}: it is unusable. The checkpoint of round "
                                     f"{server_round - 1} stays in {out}")
            sent, accepted = int(metrics["sent"]), int(metrics["accepted"])
            row = {"round": server_round, "phase": phase.name, "test_loss": scores["test_loss"],
                   "test_accuracy": scores["test_accuracy"], "train_loss": metrics["train_loss"],
                   "clients": accepted, "rejected": sent - accepted, "seconds": time.perf_counter() - start,
                   "dense_equivalent": strategy.dense_round_bytes() * sent, "bytes_down": traffic.down,
                   "bytes_up": traffic.up, "logical_down": int(metrics["logical_down"]),
                   "logical_up": int(metrics["logical_up"]),
                   **{k: v for k, v in scores.items() if k not in ("test_loss", "test_accuracy")}}
            rows.append(row)
            progress(cfg, row, total_rounds)
            if phase_round == phase.rounds and phase.on_end is not None:
                ctx.arrays, ctx.nodes = arrays, strategy.roster.partitions()
                phase.on_end(ctx)
                arrays = ctx.arrays
                failures.extend(dict(f, round=server_round) for f in strategy.failures.take())
            results.write_rounds(out / "rounds.csv", rows)
            oneoff = oneoff_before + counting.one_off()
            torch.save({"config": {**cfg, "resume": False}, "state": arrays.to_torch_state_dict(), "rows": rows,
                        "failures": failures, "oneoff": {"down": oneoff.down, "up": oneoff.up},
                        "strategy": strategy.state_dict(), "experiment": experiment.state_dict(),
                        "phase": {"index": index, "round": phase_round}}, out / (CHECKPOINT + ".tmp"))
            (out / (CHECKPOINT + ".tmp")).replace(ckpt_path)

    torch.save(arrays.to_torch_state_dict(), out / "final_model.pt")
    last = phases[-1].strategy
    oneoff = oneoff_before + counting.one_off()
    sent = sum(r["bytes_down"] + r["bytes_up"] for r in rows)
    dense = sum(r["dense_equivalent"] for r in rows)
    summary = results.summarize(cfg, rows, {
        "bytes_oneoff": oneoff.total, "oneoff_down": oneoff.down, "oneoff_up": oneoff.up,
        "density": last.density, "value_dtype": last.value_dtype, "mask_fingerprint": last.fingerprint,
        "bytes_ratio_vs_dense": dense / max(sent, 1),
        "bytes_ratio_vs_dense_with_oneoff": dense / max(sent + oneoff.total, 1),
        "failures": failures,
        "client_mask_fingerprints": {str(k): v for k, v in getattr(last, "client_fingerprints", {}).items()},
        "phases": phase_summaries(phases, rows),
        **experiment.finish(out, rows),
    })
    results.write_json(out / "summary.json", summary)
    results.plot_runs({cfg["strategy"]: rows}, {cfg["strategy"]: summary["bytes_oneoff"]}, out / "curves.png",
                      title=f"{cfg['strategy']} on {cfg['dataset']}")
    log.info("results in %s", out)
    return summary
