"""Framework overhead: wall time of a Ray-simulated FedAvg round against in-process sequential training of the
same clients on the same data (same local training code, same aggregation and central evaluation).

    python simulations/bench_overhead.py [--clients 20] [--rounds 3] [--out results/bench_overhead]

Ray start-up is reported apart. The in-process baseline trains clients one after another in this process with
as many torch threads as Ray gets CPUs; the simulation runs one client per CPU in parallel Ray actors, one thread
each. Both sides do identical arithmetic; the ratio is what Flower + Ray add (messages, serialization, actor
scheduling, idle cores at the end of a round).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from client.handlers import local_data
from fedsparse import sparse
from fedsparse.config import resolve
from fedsparse.data import load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.results import read_rounds
from fedsparse.simulation import simulate
from fedsparse.sparse import weighted_mean
from fedsparse.train import TrainConfig, evaluate, train_local


def sequential_rounds(cfg: dict, threads: int) -> list[float]:
    """Seconds per round of plain in-process FedAvg: no Flower, no Ray, no serialization."""
    torch.set_num_threads(threads)
    ds = load_dataset(cfg["dataset"], cfg["data-root"])
    model = build_model(cfg["model"], ds.input_shape, ds.num_classes, seed=cfg["seed"])
    layout = sparse.Layout.of(model.state_dict(), maskable_names(model))
    data = [local_data(cfg, p) for p in range(cfg["num-clients"])]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tc = TrainConfig(cfg["local-epochs"], cfg["batch-size"], cfg["lr"], cfg["momentum"])
    times = []
    for rnd in range(1, cfg["num-rounds"] + 1):
        start = time.perf_counter()
        updates = []
        for p, (x, y) in enumerate(data):
            net = build_model(cfg["model"], ds.input_shape, ds.num_classes, seed=0)
            net.load_state_dict(state)
            train_local(net, x, y, tc, seed=rnd * 1000 + p)
            _, after = sparse.gather(net.state_dict(), layout, None)
            _, before = sparse.gather(state, layout, None)
            updates.append((len(x), after - before))
        _, flat = sparse.gather(state, layout, None)
        state = sparse.scatter(torch.zeros(0), flat + weighted_mean(updates), layout, None)
        model.load_state_dict(state)
        evaluate(model, ds.x_test, ds.y_test)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--partitioner", default="dirichlet", help="iid gives every client the same work")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="results/bench_overhead")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    cfg = resolve({"strategy": "fedavg", "dataset": args.dataset, "partitioner": args.partitioner,
                   "num-clients": args.clients,
                   "num-rounds": args.rounds, "fraction-train": 1.0, "local-epochs": 1, "momentum": 0.9,
                   "output-dir": str(out / "ray")})

    wall = time.perf_counter()
    simulate(cfg, ray_cpus=args.cpus)
    wall = time.perf_counter() - wall
    ray_rounds = [r["seconds"] for r in read_rounds(out / "ray" / "rounds.csv")]
    seq_rounds = sequential_rounds(cfg, args.cpus)

    # round 1 of both includes one-off warm-up (data loading in each actor; first-touch allocations)
    ray_steady = sum(ray_rounds[1:]) / max(len(ray_rounds) - 1, 1)
    seq_steady = sum(seq_rounds[1:]) / max(len(seq_rounds) - 1, 1)
    result = {
        "clients": args.clients, "rounds": args.rounds, "dataset": args.dataset, "cpus": args.cpus,
        "partitioner": args.partitioner,
        "ray_round_seconds": ray_rounds, "sequential_round_seconds": seq_rounds,
        "ray_startup_and_teardown_seconds": wall - sum(ray_rounds),
        "ray_steady_round_seconds": ray_steady, "sequential_steady_round_seconds": seq_steady,
        "overhead_ratio": ray_steady / seq_steady,
    }
    (out / "bench_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"| | round 1 (s) | later rounds, mean (s) |\n|---|---:|---:|\n"
          f"| Ray simulation ({args.clients} clients, {args.cpus} CPUs) | {ray_rounds[0]:.2f} | {ray_steady:.2f} |\n"
          f"| in-process sequential, {args.cpus} threads | {seq_rounds[0]:.2f} | {seq_steady:.2f} |\n")
    print(f"overhead ratio (later rounds): {result['overhead_ratio']:.2f}x; "
          f"Ray start-up + teardown {result['ray_startup_and_teardown_seconds']:.1f} s")


if __name__ == "__main__":
    main()
