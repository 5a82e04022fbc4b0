"""Cost and quality of SSFL's cheaper saliency uploads (issue 13 section 2): for the `main` preset (Fashion-MNIST,
`cnn`, Dirichlet 0.3, 20 clients, 90% sparsity) run SSFL's one-off `query.saliency` exchange through the real
server code (`SSFL.make_mask`) and the real client handler (called in-process, no Flower simulation), once per
option, and report the exchange's bytes (Flower's count_bytes() of every message and reply) and the mask's
intersection over union with the exact (float32, dense, all clients) mask. The `rebuild` options
(`sparse.saliency-init`) send only the initial model's fingerprint down; each client rebuilds the seeded model.
No training: final accuracy is not measured here.

    .venv/bin/python simulations/bench_saliency.py [--seed 42] [--out docs/bench_saliency.md]
"""

from __future__ import annotations

import argparse
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from client.handlers import local_data, saliency
from fedsparse import sparse, transport
from fedsparse.config import resolve
from fedsparse.data import load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.replies import NodeInfo
from server.strategies.ssfl import SSFL

PRESET = Path(__file__).parent / "presets" / "main.toml"
OPTIONS = {  # label: run-config overrides of the saliency round
    "exact (float32, dense)": {},
    "float16": {"sparse.saliency-dtype": "float16"},
    "bfloat16": {"sparse.saliency-dtype": "bfloat16"},
    "topk 1x": {"sparse.saliency-topk": 1.0},
    "topk 2x": {"sparse.saliency-topk": 2.0},
    "topk 4x": {"sparse.saliency-topk": 4.0},
    "topk 1x float16": {"sparse.saliency-topk": 1.0, "sparse.saliency-dtype": "float16"},
    "topk 2x float16": {"sparse.saliency-topk": 2.0, "sparse.saliency-dtype": "float16"},
    "topk 4x float16": {"sparse.saliency-topk": 4.0, "sparse.saliency-dtype": "float16"},
    "rebuild (float32, dense)": {"sparse.saliency-init": "rebuild"},
    "rebuild + float16": {"sparse.saliency-init": "rebuild", "sparse.saliency-dtype": "float16"},
    "rebuild + topk 4x float16": {"sparse.saliency-init": "rebuild", "sparse.saliency-topk": 4.0,
                                  "sparse.saliency-dtype": "float16"},
    "half the clients (float32, dense)": {"sparse.saliency-fraction": 0.5},
    "half the clients, topk 2x float16": {"sparse.saliency-topk": 2.0, "sparse.saliency-dtype": "float16",
                                          "sparse.saliency-fraction": 0.5},
}


@dataclass
class Outcome:
    """One option's saliency exchange: bytes down and up, and its mask (flat bool over the maskable weights)."""

    down: int
    up: int
    mask: np.ndarray


class InProcessGrid:
    """A Grid stand-in: node p + 1 holds partition p and answers `query.saliency` with the real client handler;
    every message and reply is counted with Flower's count_bytes()."""

    def __init__(self, cfg: dict) -> None:
        self.cfg, self.down, self.up = cfg, 0, 0

    def get_node_ids(self) -> list[int]:
        """Every node of the run."""
        return [p + 1 for p in range(self.cfg["num-clients"])]

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        """Answer each message with the handler's reply content, counting bytes both ways."""
        out = []
        for message in messages:
            self.down += transport.content_bytes(message.content)
            content = saliency(message.content, RecordDict(), self.cfg, message.metadata.dst_node_id - 1)
            self.up += transport.content_bytes(content)
            out.append(Message(content, reply_to=message))
        return out


def run_option(base: dict, overrides: dict, model: torch.nn.Module, examples: dict[int, int]) -> Outcome:
    """The saliency exchange and mask of one option."""
    cfg = resolve({**base, **overrides})
    strategy = SSFL.from_config(cfg, maskable_names(model))
    state = model.state_dict()
    strategy.bind(ArrayRecord(state))
    strategy.roster.known = {p + 1: NodeInfo(p, n) for p, n in examples.items()}
    grid = InProcessGrid(cfg)
    masks = strategy.make_mask(grid, {p: p + 1 for p in examples}, state)
    if strategy.failures.records:
        raise RuntimeError(f"rejected replies: {strategy.failures.records}")
    flat = torch.cat([masks[k].reshape(-1) for k in strategy.layout.maskable]).numpy()
    return Outcome(grid.down, grid.up, flat)


def dense_round_bytes(model: torch.nn.Module, maskable: list[str], clients: int) -> int:
    """Payload bytes of one dense float32 FedAvg round with `clients` clients: the model down and up to each
    (Flower's count_bytes() of the arrays record, without the small config/metrics records)."""
    layout = sparse.Layout.of(model.state_dict(), maskable)
    values, dense = sparse.gather(model.state_dict(), layout, None)
    return 2 * clients * transport.make_payload(values, dense, "float32").count_bytes()


def main() -> None:
    """Run every option and print (and write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # building Messages outside an app
    start = time.time()
    base = {**tomllib.loads(PRESET.read_text()), "seed": args.seed}
    cfg = resolve(base)
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    model = build_model(cfg["model"], data.input_shape, data.num_classes, seed=cfg["seed"])  # as server.loop does
    examples = {p: len(local_data(cfg, p)[0]) for p in range(cfg["num-clients"])}
    outcomes = {label: run_option(base, overrides, model, examples) for label, overrides in OPTIONS.items()}
    exact = outcomes["exact (float32, dense)"].mask
    per_round = round(cfg["num-clients"] * cfg["fraction-train"])
    dense = dense_round_bytes(model, maskable_names(model), per_round)
    header = (f"main preset, seed {args.seed}, {cfg['num-clients']} clients, sparsity {cfg['sparse.sparsity']}, "
              f"{int(exact.sum())} of {exact.size} maskable weights kept; one dense float32 FedAvg round "
              f"({per_round} clients, model down + up) = {dense / 1e6:.2f} MB")
    lines = [header, "",
             "| option | MB down | MB up | MB one-off (saliency exchange) | vs one dense round | mask IoU with exact |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, outcome in outcomes.items():
        overlap = float((outcome.mask & exact).sum() / (outcome.mask | exact).sum())
        total = outcome.down + outcome.up
        lines.append(f"| {label} | {outcome.down / 1e6:.2f} | {outcome.up / 1e6:.2f} | {total / 1e6:.2f} | "
                     f"{total / dense:.2f}x | {overlap:.4f} |")
    lines += ["", f"wall {time.time() - start:.0f} s"]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
