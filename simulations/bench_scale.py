"""How far one machine goes: start-up time, round time and peak memory of `fedsparse run` (Flower's simulation
engine on Ray) for 100 to 100,000 virtual clients with 10 per round, and the largest model 10 clients can train.

    nice -n 5 .venv/bin/python simulations/bench_scale.py            # everything (about 12 minutes here)
    .venv/bin/python simulations/bench_scale.py --runs 100:iid 1000:iid 1000:iid:all --skip-model

What is measured, per (clients, partitioner): one `fedsparse run` subprocess (FedAvg, Fashion-MNIST, cnn, 3 rounds,
10 clients per round, 2 Ray CPUs, its own empty partition cache, so the split is drawn as on a fresh machine):
- `startup_s`: from starting the process to the start of round 1 (the time of round 1's progress line minus its
  round seconds and minus one central evaluation, estimated as round 2's line gap less round 2's seconds);
- `partition_s`: drawing the split alone (`fedsparse.data.partition_labels` into an empty cache, timed in this
  process with datasets and flwr-datasets already imported: importing them is paid once, at any client count, and
  stays in `startup_s`); `startup_excl_partition_s` is the difference;
- `round_s`: each round's seconds as the runner records them (configure, train, aggregate; evaluation excluded);
  round 1 also holds the Ray actors' first messages (importing torch, loading the data, reading the split) and,
  with discovery on demand, the query.info of its nodes, so rounds 2-3 are the steady round time;
- `first_round_done_s`: process start to the end of round 1 (start-up + round 1);
- `peak_pss_mb` / `peak_rss_mb`: the largest sum over the whole process tree (driver, Ray's raylet, GCS and
  workers) of the proportional / resident set sizes, sampled every 0.5 s with psutil (PSS is the real footprint;
  the RSS sum counts shared pages, such as Ray's object store, once per process mapping them);
- a run that fails (a split that cannot be drawn, a refused setting) is kept with its error message;
- `commit` and `measured_at`: the checkout's commit (`+dirty` with uncommitted changes) and the UTC time of the run
  (empty in runs recorded before these fields existed).
Then the model: in-process runs (server and 10 clients in one process, `server.local_grid.LocalGrid`, 1 round)
of the mlp at growing widths give peak RSS against parameter count; a least-squares line extrapolates the largest
model this machine's memory would hold (labelled as an extrapolation).

Writes `results/bench_scale/{scale.json,scale.csv,model_memory.csv,scale.png}` and prints a table.
Invariant: every number written comes from a run of this script; nothing is copied in by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "results" / "bench_scale"
PER_ROUND = 10
ROUNDS = 3
PROGRESS = "[fedsparse] round "


@dataclass
class ScaleRun:
    """One `fedsparse run` at one number of clients (see the module docstring for each field)."""

    clients: int
    partitioner: str
    discovery: str
    status: str = "ok"  # ok | failed | timeout
    error: str = ""
    wall_s: float = 0.0
    startup_s: float | None = None
    first_round_done_s: float | None = None
    partition_s: float | None = None
    startup_excl_partition_s: float | None = None
    round_s: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0
    bytes_oneoff: int | None = None
    info_queries: int | None = None  # query.info replies: bytes_oneoff / the bytes of one reply (FedAvg sends no
    # other one-off message; a query.info instruction carries no content)
    commit: str = ""
    measured_at: str = ""


@dataclass(frozen=True)
class ModelPoint:
    """Peak RSS of one in-process round of 10 clients with the mlp at one width."""

    width: int
    params: int
    peak_rss_mb: float
    seconds: float


def tree_memory(root) -> tuple[int, int]:
    """(RSS, PSS) bytes summed over `root` and all its descendants (processes that vanish while read are
    skipped). The RSS sum counts shared pages (Ray's object store in /dev/shm, shared libraries) once per process
    that maps them; PSS splits each shared page between its processes, so its sum is the tree's real footprint."""
    import psutil

    rss = pss = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for process in processes:
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


def partition_seconds(clients: int, partitioner: str, seed: int) -> tuple[float, str]:
    """(seconds, error) of drawing the Fashion-MNIST split in this process, with an empty cache."""
    import datasets  # noqa: F401  imported before the clock starts (see the module docstring)
    import flwr_datasets.partitioner  # noqa: F401

    from fedsparse.data import load_dataset, partition_labels

    labels = load_dataset("fashion-mnist", "").y_train
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FEDSPARSE_CACHE"] = cache
        start = time.perf_counter()
        try:
            partition_labels(labels, "fashion-mnist", partitioner, clients, seed, 0.3, 2, 2)
        except ValueError as err:
            return time.perf_counter() - start, str(err)
        finally:
            os.environ.pop("FEDSPARSE_CACHE", None)
    return time.perf_counter() - start, ""


def run_scale(clients: int, partitioner: str, discovery: str, work: Path, timeout: float, seed: int) -> ScaleRun:
    """One `fedsparse run` subprocess, timed from the line log and sampled for memory (module docstring)."""
    import psutil

    result = ScaleRun(clients, partitioner, discovery, commit=checkout_commit(),
                      measured_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    out = work / f"{partitioner}-{clients}-{discovery}"
    settings = [f"num-clients={clients}", f"fraction-train={PER_ROUND / clients!r}", f"num-rounds={ROUNDS}",
                "strategy=fedavg", "dataset=fashion-mnist", "model=cnn", f"partitioner={partitioner}",
                f"discovery={discovery}", f"seed={seed}", "local-epochs=1", "connect-timeout=600"]
    cmd = [sys.executable, "-m", "fedsparse.cli", "run", "--ray-cpus", "2", "--out", str(out), "--set", *settings]
    env = {**os.environ, "FEDSPARSE_CACHE": str(work / f"cache-{partitioner}-{clients}-{discovery}"),
           "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in process.stderr:
            lines.append((time.perf_counter() - start, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    root = psutil.Process(process.pid)
    peak_rss = peak_pss = 0
    while process.poll() is None:
        rss, pss = tree_memory(root)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        if time.perf_counter() - start > timeout:
            for child in root.children(recursive=True):
                child.kill()
            process.kill()
            result.status, result.error = "timeout", f"killed after {timeout:.0f} s"
            break
        time.sleep(0.5)
    process.wait()
    reader.join(timeout=5)
    result.wall_s = time.perf_counter() - start
    result.peak_rss_mb, result.peak_pss_mb = peak_rss / 2**20, peak_pss / 2**20
    progress = [(t, line) for t, line in lines if line.startswith(PROGRESS)]
    rounds_csv = out / "rounds.csv"
    if rounds_csv.exists():
        with rounds_csv.open() as handle:
            result.round_s = [float(row["seconds"]) for row in csv.DictReader(handle)]
    if process.returncode != 0 and result.status == "ok":
        result.status = "failed"
        errors = [line for _, line in lines if "Error" in line or "error" in line]
        result.error = (errors[-1] if errors else (lines[-1][1] if lines else "no output"))[:400]
    if len(progress) >= 2 and len(result.round_s) >= 2:
        evaluation = max(0.0, progress[1][0] - progress[0][0] - result.round_s[1])
        result.startup_s = progress[0][0] - result.round_s[0] - evaluation
        result.first_round_done_s = progress[0][0] - evaluation
    summary = out / "summary.json"
    if summary.exists():
        result.bytes_oneoff = int(json.loads(summary.read_text()).get("bytes_oneoff", 0))
        result.info_queries = round(result.bytes_oneoff / info_reply_bytes())
    return result


def checkout_commit() -> str:
    """The short commit of the checkout, `+dirty` when tracked files differ from it; "" outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


def info_reply_bytes() -> int:
    """Serialized bytes of one query.info reply (two int entries: the same for every partition and count)."""
    from flwr.app import MetricRecord, RecordDict

    from fedsparse.transport import content_bytes

    return content_bytes(RecordDict({"metrics": MetricRecord({"partition-id": 1, "num-examples": 1})}))


MODEL_SCRIPT = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # messages outside a running app
from fedsparse.config import resolve
from server.local_grid import LocalGrid
from server.loop import run_federation
from fedsparse.models import MODELS, build_model
width, out = int(sys.argv[1]), sys.argv[2]
plain = MODELS["mlp"]  # no config key sets a width: every build of "mlp" in this process gets this one
MODELS["mlp"] = lambda input_shape, num_classes, width=1, _w=width: plain(input_shape, num_classes, width=_w)
cfg = resolve({"dataset": "fashion-mnist", "model": "mlp", "num-clients": 10, "num-rounds": 1,
               "strategy": "fedavg", "partitioner": "iid", "train-subset": 2000, "local-epochs": 1,
               "output-dir": out})
params = sum(p.numel() for p in build_model("mlp", (1, 28, 28), 10).parameters())
start = time.perf_counter()
run_federation(LocalGrid(cfg), cfg)
print(json.dumps({"params": params, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def model_point(width: int, work: Path) -> ModelPoint:
    """Peak RSS of one round of 10 in-process clients with the mlp at `width` (a subprocess of its own)."""
    done = subprocess.run([sys.executable, "-c", MODEL_SCRIPT, str(width), str(work / f"mlp-{width}")], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mlp width {width} failed: {done.stderr[-600:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return ModelPoint(width, got["params"], got["peak_rss_mb"], got["seconds"])


def extrapolate(points: list[ModelPoint], memory_mb: float) -> dict:
    """Least-squares line peak RSS = base + per_param x params; the parameter count that reaches `memory_mb`."""
    import numpy as np

    params = np.array([p.params for p in points], dtype=float)
    rss = np.array([p.peak_rss_mb for p in points])
    per_param, base = np.polyfit(params, rss, 1)
    largest = (memory_mb - base) / per_param if per_param > 0 else float("inf")
    return {"base_mb": float(base), "bytes_per_param": float(per_param * 2**20), "memory_mb": memory_mb,
            "largest_params_extrapolated": float(largest)}


def fmt(value, pattern: str = "{:.1f}") -> str:
    return "-" if value is None else pattern.format(value)


def table(runs: list[ScaleRun]) -> str:
    """The markdown table of the runs."""
    head = ("| clients | partitioner | discovery | status | start-up s | of which split s | start-up excl. split s "
            "| to end of round 1 s | round s (1, 2, 3) | query.info sent | peak PSS MB | peak RSS MB "
            "| wall s | commit, measured |\n|---:|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
    rows = [head]
    for r in runs:
        rounds = ", ".join(f"{s:.1f}" for s in r.round_s) or "-"
        status = r.status if r.status == "ok" else f"{r.status}: {r.error[:160]}"
        rows.append(f"| {r.clients:,} | {r.partitioner} | {r.discovery} | {status} | {fmt(r.startup_s)} | "
                    f"{fmt(r.partition_s, '{:.2f}')} | {fmt(r.startup_excl_partition_s)} | {fmt(r.first_round_done_s)} | {rounds} | {fmt(r.info_queries, '{:,}')} | "
                    f"{r.peak_pss_mb:.0f} | {r.peak_rss_mb:.0f} | "
                    f"{r.wall_s:.0f} | {r.commit or '-'} {r.measured_at} |")
    return "\n".join(rows)


def plot(runs: list[ScaleRun], path: Path) -> None:
    """Start-up and mean round time against the number of clients (log x), and peak PSS; runs of earlier code
    (no commit recorded) are hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    groups = sorted({(r.partitioner, r.discovery, bool(r.commit)) for r in runs if r.status == "ok"})
    for partitioner, discovery, recorded in groups:  # runs without a recorded commit came from earlier code
        mine = [r for r in runs if (r.partitioner, r.discovery, bool(r.commit)) == (partitioner, discovery, recorded)
                and r.status == "ok"]
        label = f"{partitioner}, {discovery}" + ("" if recorded else ", earlier code")
        fill = "full" if recorded else "none"
        xs = [r.clients for r in mine]  # repeated runs at one count are separate points
        left.plot(xs, [r.startup_s for r in mine], "o", fillstyle=fill, label=f"start-up ({label})")
        left.plot(xs, [r.first_round_done_s for r in mine], "^", fillstyle=fill, label=f"end of round 1 ({label})")
        left.plot(xs, [sum(r.round_s[1:]) / max(1, len(r.round_s) - 1) for r in mine], "s", fillstyle=fill,
                  label=f"rounds 2-3, mean ({label})")
        right.plot(xs, [r.peak_pss_mb / 1024 for r in mine], "o", fillstyle=fill, label=label)
    for axis, ylabel in ((left, "seconds"), (right, "peak PSS of the process tree (GiB)")):
        axis.set_xscale("log")
        axis.set_ylim(bottom=0)
        axis.set_xlabel("virtual clients (10 per round)")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7)
    fig.suptitle("fedsparse run on one machine (2 CPUs, shared): FedAvg, Fashion-MNIST, cnn")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the runs that fail at once (no split) first, then the measured ones, the old discovery last
DEFAULT_RUNS = ["100000:iid", "100000:dirichlet", "10000:dirichlet", "100:iid", "1000:iid", "10000:iid",
                "100:dirichlet", "1000:dirichlet", "1000:iid:all", "10000:iid:all"]


def parse_run(text: str) -> tuple[int, str, str]:
    """(clients, partitioner, discovery) of "CLIENTS:PARTITIONER[:DISCOVERY]"."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit():
        raise ValueError(f"a run is CLIENTS:PARTITIONER[:DISCOVERY], got {text!r}")
    return int(parts[0]), parts[1], parts[2] if len(parts) == 3 else "auto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, metavar="CLIENTS:PARTITIONER[:DISCOVERY]",
                        help="the runs, in this order (discovery: auto, the default, or all, the old behaviour)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    parser.add_argument("--widths", type=int, nargs="*", default=[1, 8, 16, 24], help="mlp widths (model memory)")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--append", action="store_true", help="keep the runs already in OUT/scale.json (repeats)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    import psutil
    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [parse_run(text) for text in args.runs]
    runs: list[ScaleRun] = []
    kept_model: dict = {}  # with --append --skip-model, the model memory already recorded stays
    if args.append and (args.out / "scale.json").exists():
        previous = json.loads((args.out / "scale.json").read_text())
        runs = [ScaleRun(**r) for r in previous["runs"]]
        kept_model = previous.get("model_memory", {}) if args.skip_model else {}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        work = Path(tmp)
        for clients, partitioner, discovery in plan:
            run = run_scale(clients, partitioner, discovery, work, args.timeout, args.seed)
            if run.status == "ok":  # a split that cannot be drawn is not timed twice
                split_s, split_error = partition_seconds(clients, partitioner, args.seed)
                run.partition_s = None if split_error else split_s
            if run.startup_s is not None and run.partition_s is not None:
                run.startup_excl_partition_s = run.startup_s - run.partition_s
            runs.append(run)
            print(f"{clients} {partitioner} {discovery}: {run.status} wall {run.wall_s:.0f} s startup "
                  f"{fmt(run.startup_s)} s rounds {run.round_s} peak PSS {run.peak_pss_mb:.0f} MB {run.error[:300]}",
                  flush=True)
            write_runs(runs, args.out)
        model: dict = kept_model
        if not args.skip_model:
            points = []
            for width in args.widths:
                points.append(model_point(width, work))
                print(f"mlp width {width}: {points[-1]}", flush=True)
            memory_mb = psutil.virtual_memory().total / 2**20
            model = {"points": [asdict(p) for p in points], **extrapolate(points, memory_mb)}
            with (args.out / "model_memory.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(asdict(points[0])))
                writer.writeheader()
                writer.writerows(asdict(p) for p in points)
    write_runs(runs, args.out, model)
    plot(runs, args.out / "scale.png")
    print(table(runs))
    if model:
        print(f"model memory: {model['bytes_per_param']:.1f} bytes per parameter + {model['base_mb']:.0f} MB "
              f"(in-process, 10 clients); extrapolated largest model in {model['memory_mb'] / 1024:.0f} GiB: "
              f"{model['largest_params_extrapolated'] / 1e6:.0f} M parameters")
    return 0


def write_runs(runs: list[ScaleRun], out: Path, model: dict | None = None) -> None:
    """scale.json (runs, machine, model memory) and scale.csv (one row per run)."""
    import psutil

    machine = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
               "note": "shared with other jobs while measured"}
    payload = {"settings": {"per_round": PER_ROUND, "rounds": ROUNDS, "strategy": "fedavg", "model": "cnn",
                            "dataset": "fashion-mnist", "ray_cpus": 2},
               "machine": machine, "runs": [asdict(r) for r in runs], "model_memory": model or {}}
    (out / "scale.json").write_text(json.dumps(payload, indent=2) + "\n")
    with (out / "scale.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(runs[0])))
        writer.writeheader()
        for r in runs:
            writer.writerow({**asdict(r), "round_s": " ".join(f"{s:.2f}" for s in r.round_s)})


if __name__ == "__main__":
    sys.exit(main())
