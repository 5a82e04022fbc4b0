"""The server's round loop: discover clients, run the strategy's one-off phase, then rounds of train,
aggregate, evaluate centrally, write results and checkpoint. A run killed after round k and started again
with `resume=true` continues from round k+1 and ends with the same model as an uninterrupted run."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import Message, RecordDict

from fedsparse import replies, results, sparse, transport
from fedsparse.config import resolve
from fedsparse.data import load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.replies import NodeInfo, ReplyError
from fedsparse.resume import load_for_resume
from fedsparse.simulation import check_run_settings
from fedsparse.train import evaluate, pick_device
from server.strategies import STRATEGIES
from server.strategies.base import Channel, Traffic, sample_partitions

log = logging.getLogger("fedsparse")
CHECKPOINT = "checkpoint.pt"


class TrainingFailed(RuntimeError):
    """The run could not train: every reply of a round was rejected, or the global model became unusable.
    The checkpoint of the last good round stays, so the run can be resumed once the cause is fixed."""


def wait_for_nodes(grid, cfg: dict) -> None:
    """Wait up to `connect-timeout` seconds for `min-clients` (0: `num-clients`) nodes to connect."""
    wanted = cfg["min-clients"] or cfg["num-clients"]
    deadline = time.monotonic() + cfg["connect-timeout"]
    while len(list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {wanted} clients connected within "
                               f"connect-timeout ({cfg['connect-timeout']:.0f} s): start more SuperNodes "
                               "(flwr run: num-supernodes = num-clients) or lower min-clients")
        time.sleep(0.5)


@dataclass
class Roster:
    """The nodes the server knows (node id -> what it reported at discovery) and the node ids it dropped: a node
    whose query.info reply was missing, malformed, or claimed a partition another connected node holds. Neither
    is asked again; a node id is in at most one of them."""

    known: dict[int, NodeInfo] = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)

    def partitions(self) -> dict[int, int]:
        """{partition id: node id} of the known nodes."""
        return {info.partition_id: node_id for node_id, info in self.known.items()}


def discover(grid, cfg: dict, channel: Channel, roster: Roster, max_examples: int) -> None:
    """Ask every connected node the roster does not list its partition and example count (query.info).

    A reply is read through `fedsparse.replies.read_info`. A partition claimed by a node still connected is kept
    by that node; a partition whose node left is taken over by the newcomer (a restarted SuperNode with a new node
    id). Every node dropped on the way is logged and recorded in the failures: none vanishes silently."""
    connected = {int(n) for n in grid.get_node_ids()}
    new = sorted(connected - set(roster.known) - roster.dropped)
    if not new:
        return
    answers = channel.send([Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in new])
    roster.dropped.update(new)  # until a valid claim below moves a node to `known`
    claims: list[tuple[int, NodeInfo]] = []
    for r in answers:
        node_id = int(r.metadata.src_node_id)
        try:
            claims.append((node_id, replies.read_info(r.content, cfg["num-clients"], max_examples)))
        except ReplyError as err:
            channel.fail(node_id, f"dropped node: {err}", "query.info")
    for node_id, info in sorted(claims):
        holder = roster.partitions().get(info.partition_id)
        if holder is not None and holder in connected:
            channel.fail(node_id, f"dropped node: it claims partition {info.partition_id}, already held by "
                                  f"node {holder}", "query.info")
            continue
        if holder is not None:
            log.info("node %s takes over partition %d from node %s, which left", node_id, info.partition_id, holder)
            del roster.known[holder]
        roster.known[node_id] = info
        roster.dropped.discard(node_id)
    if not roster.known:
        reasons = "; ".join(f["reason"][:300] for f in channel.failures[-3:])
        raise RuntimeError(f"none of the {len(new)} clients answered; last errors: {reasons}")
    log.info("%d clients: partitions %s", len(roster.known), sorted(roster.partitions()))


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
    check_run_settings(cfg)  # under `flwr run` nothing has checked the split, the mask layers or the density yet
    out = Path(cfg["output-dir"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    # a damaged checkpoint or a refused change of settings raises ResumeError naming the file or the keys
    ckpt = load_for_resume({**cfg, "output-dir": str(out)}) if cfg["resume"] else None
    if cfg["resume"] and ckpt is None:
        log.warning("resume=true but %s does not exist: starting from round 1", ckpt_path)
    results.write_json(out / "config.json", {**cfg, "resume": False})

    device = pick_device(cfg["device"])
    ds = load_dataset(cfg["dataset"], cfg["data-root"])
    model = build_model(cfg["model"], ds.input_shape, ds.num_classes, seed=cfg["seed"])
    layout = sparse.Layout.of(model.state_dict(), maskable_names(model, tuple(cfg["sparse.mask-layers"].split(","))))
    strategy = STRATEGIES[cfg["strategy"]](cfg, layout)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows: list[dict] = []
    oneoff = Traffic()
    failures: list[dict] = []
    if ckpt is not None:
        state, rows, failures = ckpt.state, ckpt.rows, ckpt.failures
        oneoff = Traffic(**ckpt.oneoff)
        strategy.restore(ckpt.strategy)
        log.info("resuming %s after round %d", out, len(rows))

    channel = Channel(grid, cfg["round-timeout"], failures=failures)
    wait_for_nodes(grid, cfg)
    max_examples = len(ds.y_train[: cfg["train-subset"] or None])  # no client can hold more than the dataset
    roster = Roster()
    discover(grid, cfg, channel, roster, max_examples)
    oneoff.add(channel.take())
    dense_bytes = dense_round_bytes(layout, strategy)
    for server_round in range(len(rows) + 1, cfg["num-rounds"] + 1):
        start = time.perf_counter()
        discover(grid, cfg, channel, roster, max_examples)  # nodes that joined since (none: no message)
        strategy.known = roster.known
        nodes = roster.partitions()
        state = strategy.setup(channel, nodes, state, server_round)
        oneoff.add(channel.take())  # discovery, saliency, mask install: not part of any round's traffic
        picked = [p for p in sample_partitions(cfg["num-clients"], cfg["fraction-train"], cfg["seed"], server_round)
                  if p in nodes]
        msgs = strategy.configure_train(server_round, state, [nodes[p] for p in picked])
        answers = channel.send(msgs, logical_down=strategy.logical_bytes())
        strategy.note_client_errors(channel.client_errors)
        new_state, metrics = strategy.aggregate_train(server_round, answers, channel)
        traffic = channel.take()
        if new_state is None:
            for f in channel.failures:
                f.setdefault("round", server_round)
            raise TrainingFailed(f"round {server_round}: none of the {len(msgs)} train replies was accepted "
                                 f"(see the failures logged above); the run cannot train. The checkpoint of round "
                                 f"{server_round - 1} stays in {out}")
        state = new_state
        model.load_state_dict(state)
        test_loss, test_acc = evaluate(model, ds.x_test, ds.y_test, device=device)
        if not math.isfinite(test_loss):
            raise TrainingFailed(f"round {server_round}: the global model gives a test loss of {test_loss}: it "
                                 f"is unusable. The checkpoint of round {server_round - 1} stays in {out}")
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
