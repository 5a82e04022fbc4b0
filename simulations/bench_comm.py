"""Communication benchmark: what every strategy puts on the wire, and what it buys under slow links.

a. Bytes per round per client, down and up, of every strategy x density x value dtype on `cnn` (Fashion-MNIST
   shape) and `resnet18` (CIFAR shape): serialized (Flower's count_bytes of the records, built the way the
   strategies build them; a top-k reply is a Gaussian update encoded by the client's own code path) and logical
   (values x value bytes, plus index bits for top-k), the one-off bytes per client (node discovery, SSFL's
   saliency round, the mask install), and ratios to dense float32 FedAvg, to the physical limit and, for top-k,
   to FedLab's encoding (int64 index + float32 value per kept entry).
b. For finished runs (`--runs`, folders with rounds.csv + summary.json): accuracy against cumulative bytes, and
   time to `--target` accuracy over symmetric links of 1, 10 and 100 Mbit/s.
c. Encode/decode seconds of a ResNet-18-sized update at top-k density 0.1.

Writes comm_table.md, comm_table.json, bytes_per_round.png, accuracy_vs_bytes.png and time_to_accuracy.png.

    python simulations/bench_comm.py --out results/bench_comm [--runs DIR ...] [--target 0.7]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_codec import best_time  # simulations/ is the script's own folder
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from threadpoolctl import threadpool_limits

from fedsparse import codec, sparse, topk, transport
from fedsparse.config import resolve
from fedsparse.models import build_model, maskable_names
from fedsparse.results import load_run, run_label
from server.grid import CountingGrid
from server.strategies import STRATEGIES, FedAvg
from server.strategies.topk import logical_update_bytes

MODELS = {"cnn": ((1, 28, 28), 10), "resnet18": ((3, 32, 32), 10)}
DTYPES = ("float32", "float16", "bfloat16", "int8")
MASK_DENSITIES = (0.5, 0.1, 0.05)
TOPK_DENSITIES = (0.1, 0.01)
MASKED = ("ssfl", "random", "magnitude")
NPY_HEADER = 128  # np.save's header of a 1-D array
RATES_MBIT = (1, 10, 100)
SEED = 0
PAYLOAD_NOTE = (
    "Serialized = Flower count_bytes of the records a strategy builds (payload + config/metrics); 'x less' = dense "
    "float32 FedAvg / this; limit = values x value bits + dense tensors (fixed mask) or n H(d) + kept x value bits "
    "(top-k); one-off per client includes node discovery. ssfl, random and magnitude share the per-round bytes; "
    "magnitude's dense float32 warm-up rounds (warmup-rounds, default 1) are rounds like fedavg's, not in its "
    "one-off column. A magnitude row is missing where a global magnitude mask of the initial weights at that "
    "density would leave a layer empty (the strategy refuses it); its per-round bytes are ssfl's and random's."
)
RUNS_NOTE = (
    "Per round: measured compute seconds + (bytes down + up) / clients x 8 / rate (the clients of a round transfer "
    "in parallel, each over its own symmetric link); one-off bytes / clients before round 1."
)


# ------------------------------------------------------------------------------------------ a. payload bytes


def metrics_up(with_loss: bool = True) -> MetricRecord:
    """The metrics a client sends with a train reply (values do not change the byte count)."""
    m = {"num-examples": 1000, "train-loss": 0.5, "partition-id": 3}
    if not with_loss:
        del m["train-loss"]
    return MetricRecord(m)


def masked_keys(density: float, dtype: str) -> dict:
    return {"sparse.sparsity": 1 - density, "sparse.value-dtype": dtype}


STRATEGY_KEYS = {  # each strategy's own keys (a key it does not read must stay at its default)
    "fedavg": lambda density, dtype: {},
    "ssfl": masked_keys, "random": masked_keys, "magnitude": masked_keys,
    "topk": lambda density, dtype: {"sparse.topk-density": density, "sparse.value-dtype": dtype},
}


@dataclass(frozen=True)
class OneOff:
    """One-off bytes per client (discovery, saliency round, mask install): serialized and logical, down and up."""

    down: int
    up: int
    logical_down: int = 0
    logical_up: int = 0


@dataclass(frozen=True)
class FirstRound:
    """A strategy after its one-off exchanges, its first sparse round's train message and the one-off bytes."""

    strategy: FedAvg
    message: Message
    one_off: OneOff


def outside_an_app() -> None:
    """Let this process build Flower messages outside a running app (they need a task identity; flower.md 1.4)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class OneClientGrid:
    """One node (id 1, partition 3 of 4) answering the one-off exchanges the way fedsparse's client does, with replies
    of the client's sizes: query.info (its partition and example count), query.saliency (float32 scores, one per
    maskable weight) and query.install_mask (the fingerprint it was sent). Train messages are not answered: the
    benchmark builds the train reply itself."""

    def __init__(self, num_maskable: int) -> None:
        self.scores = np.random.default_rng(SEED).random(num_maskable).astype(np.float32)

    def get_node_ids(self) -> list[int]:
        return [1]

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for m in messages:
            kind = m.metadata.message_type
            if kind == "query.info":
                content = RecordDict({"metrics": metrics_up(with_loss=False)})
            elif kind == "query.saliency":
                content = RecordDict({"scores": ArrayRecord({"saliency": Array(self.scores)}),
                                      "metrics": metrics_up(with_loss=False)})
            elif kind == "query.install_mask":
                content = RecordDict({"config": ConfigRecord({"fingerprint": m.content["config"]["fingerprint"]}),
                                      "metrics": MetricRecord({"partition-id": 3})})
            else:
                continue
            replies.append(Message(content, reply_to=m))
        return replies


def first_sparse_round(name: str, model: str, state: sparse.State, maskable: list[str], density: float,
                       dtype: str) -> FirstRound:
    """The strategy `name` and its first round's train message, made by the strategy itself (configure_train on a
    one-client grid, counted by a CountingGrid): for magnitude the round after its dense warm-up; with the
    serialized one-off bytes its exchanges moved."""
    cfg = resolve({"strategy": name, "model": model, "num-clients": 4, "min-clients": 1,
                   **STRATEGY_KEYS[name](density, dtype)})
    strategy = STRATEGIES[name].from_config(cfg, maskable)
    grid = CountingGrid(OneClientGrid(sum(state[k].numel() for k in maskable)))
    server_round = 1 + (cfg["sparse.warmup-rounds"] if name == "magnitude" else 0)
    for r in range(1, server_round + 1):
        (message,) = strategy.configure_train(r, ArrayRecord(state), ConfigRecord(), grid)
    return FirstRound(strategy, message, OneOff(grid.one_off().down, grid.one_off().up))


def row(model: str, strategy: str, density: float, dtype: str, layout: sparse.Layout, payload_down: ArrayRecord,
        config_down: ConfigRecord, payload_up: ArrayRecord, fp: str, logical_down: int, logical_up: int,
        arrays_up: int, limit_up: float, oneoff: OneOff) -> dict:
    down = payload_down.count_bytes() + config_down.count_bytes()
    up = transport.content_bytes(RecordDict({"arrays": payload_up, "metrics": metrics_up(),
                                             # the client's echo (client.handlers.train_reply)
                                             "config": ConfigRecord({"mask-fingerprint": fp, "server-round": 1})}))
    return {
        "model": model, "strategy": strategy, "density": density, "dtype": dtype,
        "params": layout.num_maskable + layout.num_dense,
        "down": down, "up": up, "logical_down": logical_down, "logical_up": logical_up,
        "payload_up": payload_up.count_bytes(), "arrays_up": arrays_up,
        "oneoff_down": oneoff.down, "oneoff_up": oneoff.up, "oneoff_logical_down": oneoff.logical_down,
        "oneoff_logical_up": oneoff.logical_up, "limit_up": limit_up,
    }


def masked_rows(model: str, layout: sparse.Layout, state: sparse.State) -> list[dict]:
    """fedavg, then ssfl/random/magnitude: one per-round transport, different one-off costs. Every message down is
    the strategy's own; a reply up carries the same payload as the message down."""
    rows = []
    maskable = list(layout.maskable)
    cases = [("fedavg", 1.0, "float32")] + [(name, density, dtype) for density in MASK_DENSITIES for dtype in DTYPES
                                            for name in MASKED]
    for name, density, dtype in cases:
        try:
            first = first_sparse_round(name, model, state, maskable, density, dtype)
        except sparse.MaskError as err:  # magnitude: its mask comes from the weights, which may not allow it
            print(f"{model} {name} d={density:g} {dtype}: no row ({err})")
            continue
        s, message = first.strategy, first.message
        payload = message.content["arrays"]
        logical = s.logical_bytes()
        # logical one-off: SSFL's dense float32 model down and float32 scores up, the mask's bits down
        saliency_down = transport.logical_payload_bytes(layout, None, "float32") if name == "ssfl" else 0
        saliency_up = 4 * layout.num_maskable if name == "ssfl" else 0
        bits = sparse.pack_mask(s.masks, layout).size if s.masks is not None else 0
        oneoff = OneOff(first.one_off.down, first.one_off.up, saliency_down + bits, saliency_up)
        rows.append(row(model, name, density, dtype, layout, payload, message.content["config"], payload,
                        s.fingerprint, logical, logical, len(payload), logical, oneoff))
    return rows


def topk_rows(model: str, layout: sparse.Layout, state: sparse.State) -> list[dict]:
    rows = []
    rng = np.random.default_rng(SEED)
    update = rng.standard_normal(layout.num_maskable + layout.num_dense).astype(np.float32)
    n = update.size
    for density in TOPK_DENSITIES:
        for dtype in DTYPES:
            first = first_sparse_round("topk", model, state, list(layout.maskable), density, dtype)
            s, message = first.strategy, first.message
            buf, _ = topk.encode_topk_update(update, None, density, dtype)  # the client's own code path
            header = codec.read_header(buf, max_elements=n)
            bits = codec.entropy_bound_bits(n, header.kept)  # a mask that changes every round: n H(d)
            value_bytes = transport.VALUE_BYTES[dtype]
            r = row(model, "topk", density, dtype, layout, message.content["arrays"], message.content["config"],
                    transport.topk_arrays(buf), sparse.NO_MASK, s.logical_bytes(),
                    logical_update_bytes(header), 1, bits / 8 + header.kept * value_bytes, first.one_off)
            r.update(kept=header.kept, layout=header.layout, fedlab_up=codec.fedlab_topk_bytes(header.kept))
            rows.append(r)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Ratios to dense float32 FedAvg (of the same model), to the physical limit, to FedLab; the framing check."""
    dense = {r["model"]: r for r in rows if r["strategy"] == "fedavg"}
    for r in rows:
        ref = dense[r["model"]]
        r["ratio_round"] = (ref["down"] + ref["up"]) / (r["down"] + r["up"])
        r["ratio_up"] = ref["up"] / r["up"]
        r["up_over_limit"] = r["up"] / r["limit_up"]
        if "fedlab_up" in r:
            r["fedlab_over_up"] = r["fedlab_up"] / r["up"]
        # serialized payload within 1% of logical + one npy header (or codec header) per array
        r["framing_ok"] = r["payload_up"] <= 1.01 * r["logical_up"] + NPY_HEADER * r["arrays_up"]


def payload_table(rows: list[dict]) -> str:
    head = ("| model | strategy | density | dtype | down B | up B | logical up B | one-off down B | one-off up B "
            "| x less/round vs fedavg | x less up | up / limit | FedLab / up | framing ok |")
    lines = [head, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        fedlab = f"{r['fedlab_over_up']:.2f}" if "fedlab_over_up" in r else ""
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['density']:g} | {r['dtype']} | {r['down']:,} | {r['up']:,} "
            f"| {r['logical_up']:,} | {r['oneoff_down']:,} | {r['oneoff_up']:,} | {r['ratio_round']:.2f} "
            f"| {r['ratio_up']:.2f} | {r['up_over_limit']:.3f} | {fedlab} | {'yes' if r['framing_ok'] else 'NO'} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """The issue's targets, measured: a line each, with the number and whether it is met."""
    def pick(model, strategy, density, dtype):
        return next(r for r in rows if (r["model"], r["strategy"], r["density"], r["dtype"])
                    == (model, strategy, density, dtype))

    out = []
    ssfl = pick("cnn", "ssfl", 0.1, "float16")
    out.append(f"SSFL float16 at 90% sparsity (cnn): {ssfl['ratio_up']:.2f}x less uplink per round than dense "
               f"float32 FedAvg (goal >= 19x: {'met' if ssfl['ratio_up'] >= 19 else 'NOT met'})")
    for model in MODELS:
        t = pick(model, "topk", 0.1, "float16")
        out.append(f"top-k d=0.1 float16 ({model}): FedLab's encoding is {t['fedlab_over_up']:.2f}x our uplink "
                   f"(goal >= 2x: {'met' if t['fedlab_over_up'] >= 2 else 'NOT met'})")
    worst = max(rows, key=lambda r: (r["payload_up"] - r["logical_up"]) / r["logical_up"])
    out.append(f"serialized payload within 1% of logical + {NPY_HEADER} B per array: "
               f"{'all rows' if all(r['framing_ok'] for r in rows) else 'NOT all rows'} (largest excess: "
               f"{worst['payload_up'] - worst['logical_up']} B over {worst['logical_up']:,} B, {worst['model']} "
               f"{worst['strategy']} d={worst['density']:g} {worst['dtype']})")
    return out


def plot_bytes(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one-off costs differ between ssfl/random/magnitude, per-round bytes do not: plot one of them
    shown = [r for r in rows if r["strategy"] not in ("random", "magnitude")]
    fig, axes = plt.subplots(1, len(MODELS), figsize=(14, 9))
    for ax, model in zip(axes, MODELS, strict=True):
        mine = [r for r in shown if r["model"] == model]
        labels = [f"{r['strategy'].replace('ssfl', 'fixed mask')} d={r['density']:g} {r['dtype']}" for r in mine]
        y = np.arange(len(mine))
        ax.barh(y - 0.2, [r["down"] / 1e6 for r in mine], 0.4, label="down")
        ax.barh(y + 0.2, [r["up"] / 1e6 for r in mine], 0.4, label="up")
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        log_x(ax)
        ax.set_xlabel("MB per round per client (serialized)")
        ax.set_title(f"{model} ({mine[0]['params']:,} parameters)")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_x(ax) -> None:
    """Log x axis labelled 30, 100, 300 rather than 3x10^1 (minor labels overlapped the major ones)."""
    import matplotlib.ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


# --------------------------------------------------------------------------------- b. runs under slow links


def run_curve(folder: Path, rate_mbit: float | None) -> tuple[dict, list[tuple[float, float, float]]]:
    """(summary, [(cumulative bytes, cumulative seconds, accuracy)]) per round, one-off costs first.

    Clients of a round move their bytes in parallel over their own link of `rate_mbit`, so a round lasts its
    measured compute seconds + (bytes down + bytes up) / clients x 8 / rate; the one-off bytes (discovery,
    saliency, mask) likewise spread over all the run's clients.
    """
    summary, rounds = load_run(folder)
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    per_bit = 0.0 if rate_mbit is None else 1 / (rate_mbit * 1e6)
    total = summary.get("bytes_oneoff", 0)
    seconds = total / max(cfg.get("num-clients", 1), 1) * 8 * per_bit
    out = []
    for r in rounds:
        moved = r["bytes_down"] + r["bytes_up"]
        total += moved
        seconds += r["seconds"] + moved / max(r["clients"] + r["rejected"], 1) * 8 * per_bit
        out.append((total, seconds, r["test_accuracy"]))
    return summary, out


def runs_rows(folders: list[Path], target: float) -> list[dict]:
    rows = []
    for folder in folders:
        summary, rounds = load_run(folder)
        clients = sum(r["clients"] + r["rejected"] for r in rounds)
        r = {"run": str(folder), "label": run_label(summary, folder), "best_accuracy": summary["best_accuracy"],
             "rounds": summary["rounds"], "bytes_oneoff": summary.get("bytes_oneoff", 0),
             "bytes_per_client_round": sum(x["bytes_down"] + x["bytes_up"] for x in rounds) / max(clients, 1),
             "compute_seconds": summary["seconds"]}
        for rate in RATES_MBIT:
            _, timed = run_curve(folder, rate)
            reached = [(b, s) for b, s, acc in timed if acc >= target]
            r[f"time_{rate}mbit"] = reached[0][1] if reached else None
            r[f"bytes_at_target_{rate}mbit"] = reached[0][0] if reached else None
        rows.append(r)
    return rows


def runs_table(rows: list[dict], target: float) -> str:
    rates = " | ".join(f"s to {100 * target:.0f}% @ {rate} Mbit/s" for rate in RATES_MBIT)
    head = f"| run | rounds | best acc | MB/client/rnd | one-off MB | compute s | {rates} |"
    lines = [head, "|---|---:|---:|---:|---:|---:|" + "---:|" * len(RATES_MBIT)]
    for r in rows:
        times = " | ".join("not reached" if r[f"time_{rate}mbit"] is None else f"{r[f'time_{rate}mbit']:.0f}"
                           for rate in RATES_MBIT)
        lines.append(f"| {r['label']} | {r['rounds']} | {100 * r['best_accuracy']:.2f} "
                     f"| {r['bytes_per_client_round'] / 1e6:.3f} | {r['bytes_oneoff'] / 1e6:.2f} "
                     f"| {r['compute_seconds']:.0f} | {times} |")
    return "\n".join(lines)


def plot_runs(folders: list[Path], target: float, bytes_path: Path, time_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for folder in folders:
        summary, curve = run_curve(folder, None)
        ax.plot([b / 1e6 for b, _, _ in curve], [100 * a for _, _, a in curve], marker=".",
                label=run_label(summary, folder))
    log_x(ax)
    ax.set_xlabel("cumulative MB on the wire, all clients (down + up, one-off included)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(bytes_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(RATES_MBIT), figsize=(15, 4.5), sharey=True)
    for ax, rate in zip(axes, RATES_MBIT, strict=True):
        for folder in folders:
            summary, curve = run_curve(folder, rate)
            ax.plot([s for _, s, _ in curve], [100 * a for _, _, a in curve], marker=".",
                    label=run_label(summary, folder))
        ax.axhline(100 * target, color="grey", ls="--", lw=0.8)
        log_x(ax)
        ax.set_xlabel("simulated seconds (compute + transfer)")
        ax.set_title(f"{rate} Mbit/s symmetric links")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(time_path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ c. codec speed


def codec_speed(n: int = 11_173_962, density: float = 0.1, dtype: str = "float16", repeats: int = 2) -> dict:
    """Single-core seconds: the client's whole top-k step (select, encode, decode to correct its residual), the
    codec's encode alone, and the server's decode."""
    update = np.random.default_rng(SEED).standard_normal(n).astype(np.float32)
    with threadpool_limits(limits=1):
        step_s, (buf, _) = best_time(lambda: topk.encode_topk_update(update, None, density, dtype), repeats)
        _, idx, vals = codec.decode_sparse(buf, max_elements=n)
        enc_s, _ = best_time(lambda: codec.encode_sparse(n, idx, vals, dtype), repeats)
        dec_s, _ = best_time(lambda: codec.decode_sparse(buf, max_elements=n), repeats)
    return {"n": n, "density": density, "dtype": dtype, "bytes": len(buf), "client_topk_step_s": step_s,
            "encode_s": enc_s, "decode_s": dec_s}


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_comm"))
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="run folders with summary.json")
    parser.add_argument("--target", type=float, default=0.7, help="accuracy for time-to-accuracy")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    outside_an_app()

    rows = []
    for model, (shape, classes) in MODELS.items():
        net = build_model(model, shape, classes, seed=SEED)
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        layout = sparse.Layout.of(state, maskable_names(net))
        rows += masked_rows(model, layout, state) + topk_rows(model, layout, state)
    add_ratios(rows)
    checks = goals(rows)
    md = ["# Communication per round per client", "", PAYLOAD_NOTE, "",
          payload_table(rows), "", *[f"- {c}" for c in checks]]
    print(payload_table(rows), *checks, sep="\n")
    plot_bytes(rows, args.out / "bytes_per_round.png")

    folders = [f for f in args.runs if (f / "summary.json").exists()]
    skipped = [str(f) for f in args.runs if f not in folders]
    run_rows = runs_rows(folders, args.target) if folders else []
    if folders:
        table = runs_table(run_rows, args.target)
        md += ["", f"# Runs: time to {100 * args.target:.0f}% accuracy", "", RUNS_NOTE, "", table]
        print(table)
        plot_runs(folders, args.target, args.out / "accuracy_vs_bytes.png",
                  args.out / "time_to_accuracy.png")
    if skipped:
        print(f"skipped (no summary.json): {', '.join(skipped)}")

    speed = codec_speed()
    line = (f"{speed['n']:,} parameters, top-k density {speed['density']}, {speed['dtype']}, {speed['bytes']:,} B, "
            f"one core: codec encode {speed['encode_s']:.2f} s, decode {speed['decode_s']:.2f} s; the client's whole "
            f"top-k step (select + encode + decode for the residual) {speed['client_topk_step_s']:.2f} s")
    md += ["", "# Codec speed", "", line]
    print(line)
    (args.out / "comm_table.md").write_text("\n".join(md) + "\n")
    (args.out / "comm_table.json").write_text(json.dumps(
        {"payloads": rows, "goals": checks, "runs": run_rows, "target": args.target, "codec_speed": speed},
        indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
