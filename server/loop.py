"""The server's round loop: discover clients, run the strategy's one-off phase, then rounds of train,
aggregate, evaluate centrally, write results and checkpoint. A run killed after round k and started again
with `resume=true` continues from round k+1 and ends with the same model as an uninterrupted run."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from flwr.app import Message, RecordDict

from fedsparse import results, sparse, transport
from fedsparse.config import resolve
from fedsparse.data import load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.train import evaluate, pick_device
from server.strategies import STRATEGIES
from server.strategies.base import Channel, Traffic, sample_partitions

log = logging.getLogger("fedsparse")
CHECKPOINT = "checkpoint.pt"


def discover(grid, cfg: dict, channel: Channel) -> dict[int, int]:
    """Wait for the clients, then ask each its partition id: {partition id: node id}."""
    wanted = cfg["min-clients"] or cfg["num-clients"]
    deadline = time.monotonic() + cfg["round-timeout"]
    while len(list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {wanted} clients connected in "
                               f"{cfg['round-timeout']:.0f} s")
        time.sleep(0.5)
    node_ids = sorted(grid.get_node_ids())
    replies = channel.send([Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in node_ids])
    nodes = {int(r.content["metrics"]["partition-id"]): r.metadata.src_node_id for r in replies}
    if not nodes:
        reasons = "; ".join(f["reason"][:300] for f in channel.failures[-3:])
        raise RuntimeError(f"none of the {len(node_ids)} clients answered; last errors: {reasons}")
    log.info("%d clients: partitions %s", len(nodes), sorted(nodes))
    return nodes


def dense_round_bytes(layout: sparse.Layout, strategy) -> int:
    """Serialized bytes one client moves (down + up) in a dense float32 FedAvg round of this model."""
    values, dense = sparse.gather({k: torch.zeros(s) for k, s in layout.shapes.items()}, layout, None)
    payload = transport.make_payload(values, dense, "float32").count_bytes()
    config = strategy.train_config(1)
    config["mask-fingerprint"] = sparse.NO_MASK
    config["value-dtype"] = "float32"
    return 2 * payload + config.count_bytes()


def progress(cfg: dict, row: dict) -> None:
    print(f"[fedsparse] round {int(row['round'])}/{cfg['num-rounds']}  acc {100 * row['test_accuracy']:.2f}%  "
          f"loss {row['test_loss']:.4f}  down {row['bytes_down'] / 1e6:.3f} MB  up {row['bytes_up'] / 1e6:.3f} MB"
          f"  clients {row['clients']}  rejected {row['rejected']}  {row['seconds']:.1f} s",
          file=sys.stderr, flush=True)


def run_federation(grid, run_config: dict) -> dict:
    """Run every round; returns the summary (also written to output-dir/summary.json)."""
    cfg = resolve(run_config)
    out = Path(cfg["output-dir"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    ckpt = torch.load(ckpt_path, weights_only=False) if cfg["resume"] and ckpt_path.exists() else None
    if cfg["resume"] and ckpt is None:
        log.warning("resume=true but %s does not exist: starting from round 1", ckpt_path)
    if ckpt is not None and ckpt["config"] != {**cfg, "resume": False}:
        diff = sorted(k for k in cfg if k != "resume" and ckpt["config"].get(k) != cfg[k])
        raise RuntimeError(f"cannot resume: the checkpoint in {out} was made with other settings ({', '.join(diff)})")
    results.write_json(out / "config.json", {**cfg, "resume": False})

    device = pick_device(cfg["device"])
    ds = load_dataset(cfg["dataset"], cfg["data-root"])
    model = build_model(cfg["model"], ds.input_shape, ds.num_classes, seed=cfg["seed"])
    layout = sparse.Layout.of(model.state_dict(), maskable_names(model, tuple(cfg["mask-layers"].split(","))))
    strategy = STRATEGIES[cfg["strategy"]](cfg, layout)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows: list[dict] = []
    oneoff = Traffic()
    failures: list[dict] = []
    if ckpt is not None:
        state, rows, failures = ckpt["state"], ckpt["rows"], ckpt["failures"]
        oneoff = Traffic(**ckpt["oneoff"])
        strategy.restore(ckpt["strategy"])
        log.info("resuming %s after round %d", out, len(rows))

    channel = Channel(grid, cfg["round-timeout"], failures=failures)
    nodes = discover(grid, cfg, channel)
    oneoff.add(channel.take())
    dense_bytes = dense_round_bytes(layout, strategy)
    for server_round in range(len(rows) + 1, cfg["num-rounds"] + 1):
        start = time.perf_counter()
        state = strategy.setup(channel, nodes, state, server_round)
        oneoff.add(channel.take())  # discovery, saliency, mask install: not part of any round's traffic
        picked = [p for p in sample_partitions(cfg["num-clients"], cfg["fraction-train"], cfg["seed"], server_round)
                  if p in nodes]
        msgs = strategy.configure_train(server_round, state, [nodes[p] for p in picked])
        replies = channel.send(msgs, logical_down=strategy.logical_bytes())
        new_state, metrics = strategy.aggregate_train(server_round, replies, channel)
        traffic = channel.take()
        if new_state is None:
            log.error("round %d: every reply was rejected or failed; the global model is unchanged", server_round)
        else:
            state = new_state
        model.load_state_dict(state)
        test_loss, test_acc = evaluate(model, ds.x_test, ds.y_test, device=device)
        row = {"round": server_round, "test_loss": test_loss, "test_accuracy": test_acc,
               "train_loss": metrics["train_loss"], "clients": metrics["accepted"],
               "rejected": len(msgs) - metrics["accepted"], "seconds": time.perf_counter() - start,
               "dense_equivalent": dense_bytes * len(msgs), "bytes_down": traffic.down, "bytes_up": traffic.up,
               "logical_down": traffic.logical_down, "logical_up": traffic.logical_up}
        for f in channel.failures:
            f.setdefault("round", server_round)
        rows.append(row)
        progress(cfg, row)
        results.write_rounds(out / "rounds.csv", rows)
        torch.save({"config": {**cfg, "resume": False}, "state": state, "rows": rows, "failures": channel.failures,
                    "oneoff": vars(oneoff), "strategy": strategy.checkpoint()}, out / (CHECKPOINT + ".tmp"))
        (out / (CHECKPOINT + ".tmp")).replace(ckpt_path)

    torch.save(state, out / "final_model.pt")
    sent = sum(r["bytes_down"] + r["bytes_up"] for r in rows)
    summary = results.summarize(cfg, rows, {
        "bytes_oneoff": oneoff.down + oneoff.up, "oneoff_down": oneoff.down, "oneoff_up": oneoff.up,
        "density": strategy.density, "value_dtype": strategy.value_dtype,
        "mask_fingerprint": strategy.fingerprint,
        "bytes_ratio_vs_dense": sum(r["dense_equivalent"] for r in rows) / max(sent, 1),
        "bytes_ratio_vs_dense_with_oneoff": sum(r["dense_equivalent"] for r in rows)
        / max(sent + oneoff.down + oneoff.up, 1),
        "failures": channel.failures,
        "client_mask_fingerprints": {str(k): v for k, v in getattr(strategy, "client_fingerprints", {}).items()},
    })
    results.write_json(out / "summary.json", summary)
    results.plot_runs({cfg["strategy"]: rows}, {cfg["strategy"]: summary["bytes_oneoff"]}, out / "curves.png",
                      title=f"{cfg['strategy']} on {cfg['dataset']}")
    log.info("results in %s", out)
    return summary
