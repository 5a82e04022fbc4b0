"""The client side of LM unlearning as federated rounds: client `lmu.client` holds a forget set and asks for it to be
forgotten (experiment "lm-unlearn", `server.experiments.language_unlearning`).

The forget set (`lm_forget_set(cfg)`, cached per process, the same on every node and on the server):
- `lmu.forget = "id"`: `lmu.count` passages of `lmu.length` characters opening speaker turns of the client's own
  text (`fedsparse.lm.memorization.corpus_passages`); `lmu.count` more such passages are the never-trained twins,
  cut out of the client's text in every phase (so no model ever trains on them).
- `lmu.forget = "ood"`: `lmu.count` canaries (`make_canaries`, kind `lmu.canary-kind`) inserted `lmu.repeats` times
  each into the client's text (`insert_sequences`); `lmu.count` more canaries of the same generator, never
  inserted, are the twins.
The tokenizer holds the canaries' characters (registered in `client.language.VOCAB_EXTRAS`).

Handler `train.lmu` (`TRAIN_MESSAGE`): the train config's `lmu-mode` says what the forgetting client does:
- `full` (training phase): `lm.local-steps` AdamW steps on its text, forget set included;
- `retain` (retrain / finetune): the same steps on its text without the forget set (`LMForgetSet.retain_text`);
- `ascend` (gradient_ascent): `lmu.ascent-steps` full-batch Adam steps ascending the loss of its forget examples
  (`ascend`), at `lmu.ascent-lr`.
Every other client always trains on its own text (`client.language.client_text`), as in the lm experiment. The
reply's `num-examples` is the characters of the client's phase-1 text (the FedAvg weight, the same in every phase).

Invariants: in modes `retain` and `ascend` a client descends only on text that holds none of the forget examples;
no mode ever trains on a twin.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import RecordDict

from client.handlers import example_bound, handler
from client.language import VOCAB_EXTRAS, client_text, lm_corpus, lm_reply, local_steps, receive_lm
from fedsparse.lm.memorization import (
    CANARY_ALPHABET,
    ForgetSet,
    corpus_passages,
    insert_sequences,
    make_canaries,
    remove_sequences,
)
from fedsparse.lm.model import GPT, next_token_loss
from fedsparse.lm.tokenizer import CharTokenizer

EXPERIMENT = "lm-unlearn"
TRAIN_MESSAGE = "train.lmu"
MODES = ("full", "retain", "ascend")
VOCAB_EXTRAS[EXPERIMENT] = CANARY_ALPHABET + string.digits + " =;+-*/%^&|"  # every canary kind's characters


@dataclass(frozen=True, eq=False)
class LMForgetSet:
    """The forget set of client `client` and its texts: `full_text` (training phase, forget set included; ID twins
    cut out) and `retain_text` (the same without the forget examples)."""

    forget: ForgetSet
    client: int
    full_text: str
    retain_text: str


@lru_cache(maxsize=4)
def _forget_set(text: str, client: int, kind: str, canary_kind: str, count: int, length: int, repeats: int,
                seed: int) -> LMForgetSet:
    if kind == "id":
        passages = corpus_passages(text, 2 * count, length, seed)
        examples, twins = passages[:count], passages[count:]
        full = remove_sequences(text, twins)
        retain = remove_sequences(full, examples)
    else:
        canaries = make_canaries(canary_kind, 2 * count, length, seed)
        examples, twins = canaries[:count], canaries[count:]
        full, retain = insert_sequences(text, examples, repeats, seed), text
    name = "id passages" if kind == "id" else f"ood {canary_kind} canaries"
    return LMForgetSet(ForgetSet(name, kind == "id", examples, twins), client, full, retain)


def lm_forget_set(cfg: dict) -> LMForgetSet:
    """The run's forget set, its twins and the forgetting client's texts (module docstring; cached per process).
    ValueError when the client's text cannot supply it (too few turns of `lmu.length` characters)."""
    client = cfg["lmu.client"]
    return _forget_set(client_text(cfg, client), client, cfg["lmu.forget"], cfg["lmu.canary-kind"],
                       cfg["lmu.count"], cfg["lmu.length"], cfg["lmu.repeats"], cfg["seed"])


def training_text(cfg: dict, partition_id: int, mode: str) -> str:
    """The text client `partition_id` descends on in `mode` ("full" or "retain"): its own text, or for the
    forgetting client its text with ("full") or without ("retain") the forget set."""
    if mode not in ("full", "retain"):
        raise ValueError(f"training_text: mode must be 'full' or 'retain', got {mode!r}")
    if partition_id != cfg["lmu.client"]:
        return client_text(cfg, partition_id)
    forget = lm_forget_set(cfg)
    return forget.full_text if mode == "full" else forget.retain_text


def ascend(model: GPT, tokenizer: CharTokenizer, examples: list[str], steps: int, lr: float) -> float:
    """`steps` full-batch Adam steps on minus the mean next-token loss of `examples` (all of one length, each
    scored on its own); returns their mean loss before the first step."""
    lengths = {len(e) for e in examples}
    if len(lengths) != 1:
        raise ValueError(f"ascend needs examples of one length, got lengths {sorted(lengths)}")
    batch = torch.stack([tokenizer.encode_tensor(e) for e in examples])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    first = float("nan")
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = next_token_loss(model, batch)
        if step == 0:
            first = float(loss.detach())
        (-loss).backward()
        optimizer.step()
    return first


def _seed(cfg: dict, server_round: int, partition_id: int) -> int:
    return (cfg["seed"] * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


@example_bound(EXPERIMENT)
def text_size(cfg: dict, partition_id: int) -> int:
    """The characters of the client's training-phase text (its FedAvg weight in every round)."""
    return len(training_text(cfg, partition_id, "full"))


@handler(TRAIN_MESSAGE)
def lmu_train(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """A round of the LM unlearning experiment: descend on this client's text of the round's `lmu-mode`, or (the
    forgetting client in mode `ascend`) ascend on the forget set; reply the update."""
    config = content["config"]
    mode = str(config.get("lmu-mode", "full"))
    if mode not in MODES:
        raise ValueError(f"train config 'lmu-mode' must be one of {MODES}, got {mode!r}")
    model = receive_lm(content, cfg)
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server_round = int(config["server-round"])
    if mode == "ascend" and partition_id == cfg["lmu.client"]:
        forget = lm_forget_set(cfg).forget
        loss = ascend(model, lm_corpus(cfg).tokenizer, forget.examples, cfg["lmu.ascent-steps"], cfg["lmu.ascent-lr"])
    else:
        text = training_text(cfg, partition_id, "full" if mode == "full" else "retain")
        loss = local_steps(model, text, cfg, float(config["lr"]), _seed(cfg, server_round, partition_id))
    return lm_reply(model, received, content, {"num-examples": text_size(cfg, partition_id), "train-loss": loss,
                                               "partition-id": partition_id})
