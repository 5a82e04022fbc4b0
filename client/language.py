"""The client side of the language-model experiment: the char GPT of `fedsparse.lm` trained by federated rounds.

Pieces other LM experiments reuse (module-level functions, cached per process):
- `lm_corpus(cfg)`: the corpus (tiny-shakespeare, `fedsparse.lm.corpus.load_shakespeare` with the run's data
  root), its character tokenizer (built from the whole corpus, so every client and the server agree), the
  train/validation split (`lm.val-fraction`, cut at a turn boundary) and the speaker partition of the training
  text over `num-clients` (`partition_by_speaker`: every speaker with all of their turns goes to one client; a
  non-IID split by who speaks, as LEAF's Shakespeare).
- `client_text(cfg, partition_id)`: that client's training text.
- `build_lm(cfg, seed)`: the GPT the `lm.*` keys describe.
- `receive_lm(content, cfg)` / `lm_reply(...)`: the model of a train message in, the update out, through the same
  transport as every image round (`fedsparse.transport`, dense payload: no mask), so bytes are counted alike.

Handler (registered in `client.handlers.HANDLERS`; `client.client_app` imports this module):
- `train.lm` (`TRAIN_MESSAGE`): `lm.local-steps` AdamW steps (`fedsparse.lm.train.train_lm`, constant learning rate =
  the round's `lr`) on random windows of the client's own text, seeded by (seed, round, partition); the reply is the
  update and `num-examples` = the characters of the client's text (FedAvg weights by text size).

Invariant: a client trains only on `client_text` of its own partition (tested by instrumenting `train_lm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.handlers import example_bound, handler
from fedsparse import sparse, transport
from fedsparse.lm.corpus import SpeakerPartition, load_shakespeare, partition_by_speaker, train_val_split
from fedsparse.lm.model import GPT, GPTConfig
from fedsparse.lm.tokenizer import CharTokenizer
from fedsparse.lm.train import TrainConfig, train_lm

TRAIN_MESSAGE = "train.lm"


@dataclass(frozen=True, eq=False)
class LMCorpus:
    """The corpus of a run: whole text, tokenizer, train/validation text and the speaker partition of train."""

    text: str
    tokenizer: CharTokenizer
    train: str
    val: str
    partition: SpeakerPartition


VOCAB_EXTRAS: dict[str, str] = {}
"""Experiment name -> characters its tokenizer holds beyond the corpus's (an LM experiment that inserts sequences of
other characters into the text, such as canaries, registers them; the lm experiment registers none)."""


@lru_cache(maxsize=2)
def _corpus(data_root: str, val_fraction: float, num_clients: int, seed: int, extra_chars: str = "") -> LMCorpus:
    text = load_shakespeare(data_root or None)
    split = train_val_split(text, val_fraction)
    return LMCorpus(text, CharTokenizer.from_texts(text, extra_chars), split.train, split.val,
                    partition_by_speaker(split.train, num_clients, seed))


def lm_corpus(cfg: dict) -> LMCorpus:
    """The run's corpus, tokenizer (the corpus's characters plus the experiment's `VOCAB_EXTRAS`), split and
    partition (cached per process)."""
    return _corpus(cfg["data-root"], cfg["lm.val-fraction"], cfg["num-clients"], cfg["seed"],
                   VOCAB_EXTRAS.get(cfg["experiment"], ""))


def client_text(cfg: dict, partition_id: int) -> str:
    """The training text of client `partition_id`: the turns of its speakers, in corpus order."""
    corpus = lm_corpus(cfg)
    return corpus.partition.client_text(corpus.train, partition_id)


def gpt_config(cfg: dict) -> GPTConfig:
    """The transformer's shape from the `lm.*` keys and the corpus's vocabulary."""
    return GPTConfig(vocab_size=lm_corpus(cfg).tokenizer.vocab_size, block_size=cfg["lm.block-size"],
                     n_layer=cfg["lm.layers"], n_head=cfg["lm.heads"], n_embd=cfg["lm.embd"])


def build_lm(cfg: dict, seed: int) -> GPT:
    """A GPT of the run's shape, initialised from `seed`."""
    torch.manual_seed(seed)
    return GPT(gpt_config(cfg))


def lm_layout(model: GPT) -> sparse.Layout:
    """The payload layout of an LM round: every tensor dense (no mask)."""
    return sparse.Layout.of(model.state_dict(), [])


def receive_lm(content: RecordDict, cfg: dict) -> GPT:
    """The GPT a train message carries (dense payload in the message's value-dtype)."""
    model = build_lm(cfg, seed=0)
    layout = lm_layout(model)
    dtype = str(content["config"].get("value-dtype", "float32"))
    values, dense = transport.read_payload(content["arrays"], layout, None, dtype)
    model.load_state_dict(sparse.scatter(values, dense, layout, None))
    return model


def lm_reply(model: GPT, received: dict[str, torch.Tensor], content: RecordDict, metrics: dict) -> RecordDict:
    """The reply to an LM train message: the update (trained - received) as a dense payload, the metrics, and the
    echoed round and (no) mask the server checks."""
    layout = lm_layout(model)
    trained = {k: v.detach() for k, v in model.state_dict().items()}
    update = sparse.flatten({k: trained[k] - received[k] for k in layout.dense}, layout.dense)
    config = content["config"]
    return RecordDict({
        "arrays": transport.make_payload(torch.zeros(0), update, str(config.get("value-dtype", "float32"))),
        "metrics": MetricRecord(metrics),
        "config": ConfigRecord({"mask-fingerprint": sparse.NO_MASK, "server-round": int(config["server-round"])}),
    })


def local_steps(model: GPT, text: str, cfg: dict, lr: float, seed: int) -> float:
    """`lm.local-steps` AdamW steps at a constant `lr` on random windows of `text`; the mean training loss."""
    stream = lm_corpus(cfg).tokenizer.encode_tensor(text)
    settings = TrainConfig(steps=cfg["lm.local-steps"], batch_size=cfg["batch-size"], lr=lr, min_lr_ratio=1.0,
                           warmup_steps=0, weight_decay=cfg["weight-decay"], grad_clip=cfg["grad-clip"], seed=seed)
    return train_lm(model, stream, settings).final_train_loss


def _seed(cfg: dict, server_round: int, partition_id: int) -> int:
    return (cfg["seed"] * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


@example_bound("lm")
def text_size(cfg: dict, partition_id: int) -> int:
    """What an LM client reports at discovery: the characters of its text (the bound of its replies)."""
    return len(client_text(cfg, partition_id))


@handler(TRAIN_MESSAGE)
def lm_train(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """A FedAvg round of the LM: local steps on this client's text, reply the update."""
    model = receive_lm(content, cfg)
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = content["config"]
    text = client_text(cfg, partition_id)
    loss = local_steps(model, text, cfg, float(config["lr"]), _seed(cfg, int(config["server-round"]), partition_id))
    return lm_reply(model, received, content, {"num-examples": len(text), "train-loss": loss,
                                               "partition-id": partition_id})
