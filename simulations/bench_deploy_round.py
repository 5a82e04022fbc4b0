"""Where a deployed round's time goes: the real 3-SuperNode local deployment against its floor and its training.

    python simulations/bench_deploy_round.py [--rounds 3] [--before DIR] [--skip-floor] [--out FILE]

Three parts, all on the README's setting (SSFL at 90% sparsity on digits, 3 clients, 1 local epoch):

1. One ClientApp train message's pieces in CPU seconds (wall seconds on a shared machine measure the other jobs), each
   in a fresh interpreter as `flwr-clientapp` starts one per message: interpreter start, importing Flower's
   ClientApp API, torch, our ClientApp; then resolving the run config, building the model and getting the client's
   partition (cold: the node's first message, nothing prepared on disk; warm: every later message, the config
   record read back and the partition memory-mapped from `fedsparse.partition_cache`), one local epoch (the first
   of its process), the whole process of a warm train message, and whether it imported torch._dynamo.
2. Training alone: the local epoch of each client in this process (warm, one thread, CPU seconds), the slowest
   client and the sum.
3. The deployment (`fedsparse.local_deployment.LocalDeployment`: TLS, node authentication, process isolation) and
   in it one run of our ClientApp, one of the floor (`simulations/floor_clientapp.py`: train messages answered with
   a zero update, importing flwr and numpy only) and, with `--before DIR` (a checkout of older code), one of that
   code's ClientApp; each run's seconds per round from its rounds.csv.

The goal of issue 13: a round (after the first, which holds the one-off saliency and mask exchange) takes at most
2 x the floor's round plus the training time. Every process runs with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOOR_APP = "simulations.floor_clientapp:app"
IMPORT_STEPS = {
    "interpreter start": "pass",
    "import flwr ClientApp API": "import flwr.app, flwr.clientapp",
    "import torch": "import torch",
    "import torch._dynamo": "import torch, torch._dynamo",  # what torch.optim imports (not fedsparse.optim.sgd.SGD)
    "import our ClientApp": "import client.client_app",
}
# One train message's own work after the imports, in a fresh interpreter: the model, the client's partition and
# one local epoch (a torch.optim optimiser would import torch._dynamo there; fedsparse.optim.sgd.SGD does not).
MESSAGE_SCRIPT = """
import json, sys, time
import torch
torch.set_num_threads(1)
t0 = time.process_time()
import client.client_app
from client.handlers import local_data, model_and_layout
from fedsparse.train import TrainConfig, train_local
try:  # what the ClientApp resolves its run config with (older code: resolve, every message)
    from client.client_app import client_config as configure
except ImportError:
    from fedsparse.config import resolve as configure
t1 = time.process_time()
cfg = configure({"strategy": "ssfl", "dataset": "digits", "num-clients": 3, "output-dir": sys.argv[1]})
t2 = time.process_time()
net, _ = model_and_layout(cfg)
t3 = time.process_time()
x, y = local_data(cfg, 0)
t4 = time.process_time()
settings = TrainConfig(cfg["local-epochs"], cfg["batch-size"], cfg["lr"], cfg["momentum"], cfg["weight-decay"],
                       cfg["grad-clip"], optimizer=cfg["optimizer"])
train_local(net, x, y, settings, seed=0)
t5 = time.process_time()
print(json.dumps({"imports": t1 - t0, "config": t2 - t1, "model": t3 - t2, "data": t4 - t3, "train": t5 - t4,
                  "examples": len(x), "dynamo": "torch._dynamo" in sys.modules}))
"""


@dataclass(frozen=True)
class Pieces:
    """CPU seconds of one ClientApp message's pieces (fresh interpreters)."""

    interpreter: float
    flwr: float  # importing flwr.app + flwr.clientapp, beyond the interpreter start
    torch: float  # importing torch, beyond the interpreter start
    dynamo: float  # importing torch._dynamo beyond torch: every torch.optim step() imports it, fedsparse.optim.sgd.SGD does not
    our_app: float  # importing client.client_app, beyond the interpreter start (includes flwr and torch)
    config_cold: float  # resolving the run config, the node's first message
    config_warm: float  # the same in a later message
    model: float  # building the model (first message of a process; dataset shape prepared)
    data_cold: float  # the client's partition with nothing prepared on disk
    data_warm: float  # the same with its partition prepared (later messages)
    train_first: float  # one local epoch, the first of the process (with whatever its first optimiser step imports)
    message_warm: float  # the whole fresh process of a later train message: interpreter to end of training
    dynamo_imported: bool  # whether a train message's process ends with torch._dynamo imported


def _env(code_dir: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(code_dir), "FEDSPARSE_CACHE": str(cache), "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu(code: str, code_dir: Path, cache: Path, repeats: int) -> float:
    """Median CPU seconds (user + system) of `python -c code` in `code_dir`."""
    times = []
    for _ in range(repeats):
        start = _children_cpu()
        subprocess.run([sys.executable, "-c", code], cwd=code_dir, env=_env(code_dir, cache), check=True,
                       stdout=subprocess.DEVNULL)
        times.append(_children_cpu() - start)
    return statistics.median(times)


def _message(code_dir: Path, cache: Path, output_dir: Path) -> dict[str, float]:
    """One train message's pieces in a fresh interpreter, plus "process": that interpreter's CPU seconds."""
    start = _children_cpu()
    out = subprocess.run([sys.executable, "-c", MESSAGE_SCRIPT, str(output_dir)], cwd=code_dir,
                         env=_env(code_dir, cache), check=True, capture_output=True, text=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process": _children_cpu() - start}


def measure_pieces(code_dir: Path, repeats: int = 3) -> Pieces:
    """One message's pieces for the code in `code_dir` (this checkout or `--before`)."""
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        cache, output = Path(tmp) / "cache", Path(tmp) / "out"
        cpu = {name: _cpu(code, code_dir, cache, repeats) for name, code in IMPORT_STEPS.items()}
        cold = _message(code_dir, cache, output)  # writes what later messages find prepared
        warm = [_message(code_dir, cache, output) for _ in range(repeats)]
    start = cpu["interpreter start"]
    return Pieces(interpreter=start, flwr=cpu["import flwr ClientApp API"] - start,
                  torch=cpu["import torch"] - start, dynamo=cpu["import torch._dynamo"] - cpu["import torch"],
                  our_app=cpu["import our ClientApp"] - start,
                  config_cold=cold["config"], config_warm=statistics.median(w["config"] for w in warm),
                  model=statistics.median(w["model"] for w in warm), data_cold=cold["data"],
                  data_warm=statistics.median(w["data"] for w in warm),
                  train_first=statistics.median(w["train"] for w in warm),
                  message_warm=statistics.median(w["process"] for w in warm),
                  dynamo_imported=any(w["dynamo"] for w in [cold, *warm]))


def training_seconds(num_clients: int = 3) -> list[float]:
    """CPU seconds of each client's local epoch, in this process with one thread (warm: data and model ready)."""
    import torch

    from client.handlers import local_data, model_and_layout
    from fedsparse.config import resolve
    from fedsparse.local_deployment import DEFAULT_RUN
    from fedsparse.train import TrainConfig, train_local

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-deploy-train-") as tmp:
        cfg = resolve({**DEFAULT_RUN, "num-clients": num_clients, "output-dir": tmp})
        net, _ = model_and_layout(cfg)
        settings = TrainConfig(cfg["local-epochs"], cfg["batch-size"], cfg["lr"], cfg["momentum"],
                               cfg["weight-decay"], cfg["grad-clip"], optimizer=cfg["optimizer"])
        seconds = []
        for partition in range(num_clients):
            x, y = local_data(cfg, partition)
            train_local(net, x, y, settings, seed=partition)  # warm-up: first-call costs are not training
            start = time.process_time()
            train_local(net, x, y, settings, seed=partition)
            seconds.append(time.process_time() - start)
    return seconds


def floor_app(dest: Path) -> Path:
    """A copy of the Flower app whose ClientApp is the floor (`simulations/floor_clientapp.py`)."""
    from fedsparse.local_deployment import app_with_clientapp

    return app_with_clientapp(ROOT, dest, FLOOR_APP, "simulations/floor_clientapp.py")


def deployed_rounds(rounds: int, apps: dict[str, Path | None], workdir: Path) -> dict[str, list[float]]:
    """{name: seconds per round} of one SSFL run per app in one 3-node deployment (None: this checkout)."""
    from fedsparse.flower_cli import FINISHED_OK
    from fedsparse.local_deployment import LocalDeployment

    out = {}
    with LocalDeployment(nodes=3, workdir=workdir) as dep:
        for name, app_dir in apps.items():
            run_id = dep.submit({"num-rounds": rounds}, app_dir=app_dir)
            status = dep.wait(run_id, timeout=1200)
            if status["status"] != FINISHED_OK:
                raise RuntimeError(f"run {name} ended {status['status']}; logs in {dep.logs}")
            out[name] = [row["seconds"] for row in dep.round_rows(run_id)]
            dep.log(f"{name}: seconds per round {out[name]}")
    return out


def main() -> None:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a checkout of older code to measure beside this one")
    parser.add_argument("--skip-floor", action="store_true", help="no floor run")
    parser.add_argument("--skip-deployment", action="store_true", help="only the pieces and the training")
    parser.add_argument("--repeats", type=int, default=3, help="fresh interpreters per piece (median)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 1 holds the one-off exchange")
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    codes = {"ours": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    pieces = {name: measure_pieces(code, args.repeats) for name, code in codes.items()}
    for name, p in pieces.items():
        print(f"[{name}] one message, CPU: " + ", ".join(f"{k} {v}" if isinstance(v, bool) else f"{k} {v:.2f} s"
                                                         for k, v in asdict(p).items()),
              flush=True)
    train = training_seconds()
    print(f"training: {', '.join(f'{s:.2f}' for s in train)} s per client (slowest {max(train):.2f}, "
          f"sum {sum(train):.2f})", flush=True)
    report = {"pieces": {k: asdict(v) for k, v in pieces.items()}, "training": train}
    if not args.skip_deployment:
        with tempfile.TemporaryDirectory(prefix="bench-deploy-run-") as tmp:
            apps: dict[str, Path | None] = {"ours": None}
            if not args.skip_floor:
                apps["floor"] = floor_app(Path(tmp) / "floor-app")
            if args.before:
                apps["before"] = args.before.resolve()
            report["rounds"] = deployed_rounds(args.rounds, apps, Path(tmp) / "deployment")
        for name, secs in report["rounds"].items():
            later = secs[1:]
            print(f"{name}: round seconds {', '.join(f'{s:.1f}' for s in secs)} (later rounds mean "
                  f"{statistics.mean(later):.1f})")
        if "floor" in report["rounds"]:
            ours = statistics.mean(report["rounds"]["ours"][1:])
            floor = statistics.mean(report["rounds"]["floor"][1:])
            bound = 2 * floor + max(train)
            print(f"goal: round {ours:.1f} s <= 2 x floor {floor:.1f} s + training {max(train):.2f} s = {bound:.1f} s:"
                  f" {'MET' if ours <= bound else f'NOT met (by {ours - bound:.1f} s)'}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
