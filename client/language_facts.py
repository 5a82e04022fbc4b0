"""The client side of federated mechanistic unlearning of facts (experiment "lm-mechanistic",
`server.experiments.language_facts`; issue 12, sections 3 and 4).

Every client holds its speakers' text (`client.language.client_text`) plus its own synthetic facts (subject ->
sport, `fedsparse.lm.facts`): the run invents `num-clients x lmf.facts` facts (`run_facts`, seeded, distinct
subjects) and client c holds the c-th block of `lmf.facts`. Its training text (`training_text`) is
`facts_text(own facts, own text, lmf.repeats)`: every fact in every prompt format `lmf.repeats` times, each line
after a chunk of `lmf.corpus-chunk` characters of the client's text.

Handlers (the train config's `lmf-mode` says what a round does):
- `train.lmf`, mode `teach` (phase 1): `lm.local-steps` AdamW steps on the client's training text;
- `train.lmf`, mode `unlearn` (phase 2): inside the installed mask only (`fedsparse.lm.mechanistic.masked_finetune`,
  so every entry outside it is bit-identical to the received model, and the update there is exactly 0): client
  `lmf.client` runs `lmf.unlearn-steps` Adam steps of the library's unlearning objective (`unlearn_facts`: forget
  loss on its facts in prompt format `lmf.train-format` + LM loss on its text); every other client runs as many steps
  maintaining its own facts (cross-entropy, same format) + LM loss on its training text;
- `query.lmf_mask`: client `lmf.client` alone localizes its facts in the received model (`localize`) and replies
  the mask as packed bits (1 bit per parameter entry);
- `query.lmf_install`: a client stores the mask bits and their fingerprint in its node state; an `unlearn` round
  whose `lmf-mask` fingerprint differs from the held one fails with `MaskMissing` (an error reply).

Invariants: the facts and texts are functions of the config (the same on every node and the server); only client
`lmf.client` ever sees its facts' subjects in a localization; no mode changes a parameter entry outside the mask.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client.handlers import example_bound, handler
from client.language import build_lm, client_text, lm_corpus, lm_reply, local_steps, receive_lm
from client.unlearning import mask_fingerprint, pack_parameter_mask, unpack_parameter_mask
from fedsparse.lm.facts import ATTRIBUTE_END, Fact, FactSplits, facts_text, make_facts, render_prompt
from fedsparse.lm.mechanistic import (
    EditConfig,
    Localization,
    Mask,
    answer_logprobs,
    localize_all_mlps,
    localize_all_weights,
    localize_attribution_patching,
    localize_causal_tracing,
    localize_lookup_mlps,
    localize_random,
    make_patching_batches,
    masked_finetune,
    unlearn_facts,
)
from fedsparse.lm.model import GPT, next_token_loss
from fedsparse.lm.train import sample_batch

EXPERIMENT = "lm-mechanistic"
TRAIN_MESSAGE = "train.lmf"
MASK_MESSAGE = "query.lmf_mask"
INSTALL_MESSAGE = "query.lmf_install"
MODES = ("teach", "unlearn")
LOCALIZATIONS = ("lookup_mlps", "causal_tracing", "attribution_patching", "random", "all_mlps", "all_weights")
MASK_BITS = "lmf-mask-bits"
MASK_INFO = "lmf-mask-info"


class MaskMissing(RuntimeError):
    """An unlearning round names a mask this node does not hold (it missed the install)."""

    def __init__(self, expected: str, held: str) -> None:
        super().__init__(f"the round trains in mask {expected}, this node holds {held or 'none'}")
        self.expected, self.held = expected, held


@lru_cache(maxsize=4)
def _facts(count: int, seed: int) -> tuple[Fact, ...]:
    return tuple(make_facts(count, seed=seed))


def run_facts(cfg: dict) -> tuple[Fact, ...]:
    """All facts of the run: `num-clients x lmf.facts`, client c holding block c (module docstring)."""
    return _facts(cfg["num-clients"] * cfg["lmf.facts"], cfg["seed"])


def client_facts(cfg: dict, partition_id: int) -> tuple[Fact, ...]:
    """The facts client `partition_id` holds."""
    per_client = cfg["lmf.facts"]
    return run_facts(cfg)[partition_id * per_client:(partition_id + 1) * per_client]


def maintained_facts(cfg: dict) -> tuple[Fact, ...]:
    """The facts of every client except `lmf.client` (the ones the federation keeps)."""
    forgetting = cfg["lmf.client"]
    return tuple(f for c in range(cfg["num-clients"]) if c != forgetting for f in client_facts(cfg, c))


@lru_cache(maxsize=8)
def _training_text(text: str, facts: tuple[Fact, ...], repeats: int, chunk: int, seed: int) -> str:
    return facts_text(facts, text, repeats, seed=seed, corpus_chunk=chunk)


def training_text(cfg: dict, partition_id: int) -> str:
    """Client `partition_id`'s text with its facts woven in (module docstring; cached per process)."""
    return _training_text(client_text(cfg, partition_id), client_facts(cfg, partition_id), cfg["lmf.repeats"],
                          cfg["lmf.corpus-chunk"], cfg["seed"] + partition_id)


def localize(model: GPT, cfg: dict, facts: tuple[Fact, ...], method: str) -> Localization:
    """The `method` localization of `facts` in `model` (patching batches of prompt format `lmf.train-format`).

    `causal_tracing`, `attribution_patching` and `random` are matched to the parameter count of the
    `lmf.lookup-layers` lookup MLPs; `all_mlps` and `all_weights` keep their natural sizes (the unlocalized
    baselines, as `fedsparse.lm.mechanistic.localize_all`). ValueError on an unknown method."""
    if method not in LOCALIZATIONS:
        raise ValueError(f"localization must be one of {LOCALIZATIONS}, got {method!r}")
    seed = cfg["seed"]
    if method == "all_mlps":
        return localize_all_mlps(model, seed=seed)
    if method == "all_weights":
        return localize_all_weights(model, seed=seed)
    batches = make_patching_batches(facts, lm_corpus(cfg).tokenizer, cfg["lmf.train-format"], seed)
    lookup = localize_lookup_mlps(model, batches, cfg["lmf.lookup-layers"], seed=seed)
    count = lookup.parameter_count
    if method == "lookup_mlps":
        return lookup
    if method == "causal_tracing":
        return localize_causal_tracing(model, batches, count, seed)
    if method == "attribution_patching":
        return localize_attribution_patching(model, batches, count, seed)
    return localize_random(model, count, seed)


def maintain(model: GPT, mask: Mask, facts: tuple[Fact, ...], stream: torch.Tensor, cfg: dict, seed: int) -> float:
    """`lmf.unlearn-steps` masked Adam steps on cross-entropy of `facts` (format `lmf.train-format`) + LM loss on
    `stream`; the mean loss."""
    tokenizer = lm_corpus(cfg).tokenizer
    prompts = [render_prompt(f.subject, cfg["lmf.train-format"]) for f in facts]
    answers = [f.attribute + ATTRIBUTE_END for f in facts]
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(_step: int) -> torch.Tensor:
        batch = sample_batch(stream, 8, model.config.block_size, generator)
        return -answer_logprobs(model, tokenizer, prompts, answers).mean() + next_token_loss(model, batch)

    losses = masked_finetune(model, mask, loss_fn, cfg["lmf.unlearn-steps"], cfg["lmf.unlearn-lr"], cfg["grad-clip"])
    return float(np.mean(losses)) if losses else float("nan")


def forget(model: GPT, mask: Mask, cfg: dict, partition_id: int, seed: int) -> float:
    """The library's masked unlearning (`unlearn_facts`) of this client's facts for `lmf.unlearn-steps` steps; the
    mean loss."""
    corpus = lm_corpus(cfg)
    settings = EditConfig(steps=cfg["lmf.unlearn-steps"], lr=cfg["lmf.unlearn-lr"], maintain_weight=0.0,
                          train_format=cfg["lmf.train-format"], grad_clip=cfg["grad-clip"], seed=seed)
    splits = FactSplits(forget=client_facts(cfg, partition_id), maintain=())
    stream = corpus.tokenizer.encode_tensor(client_text(cfg, partition_id))
    losses = unlearn_facts(model, corpus.tokenizer, mask, splits, stream, settings)
    return float(np.mean(losses)) if losses else float("nan")


def _seed(cfg: dict, server_round: int, partition_id: int) -> int:
    return (cfg["seed"] * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


@example_bound(EXPERIMENT)
def text_size(cfg: dict, partition_id: int) -> int:
    """The characters of the client's training text (its FedAvg weight in every round)."""
    return len(training_text(cfg, partition_id))


def held_mask(state: RecordDict, model: GPT, fingerprint: str) -> Mask:
    """The installed mask, if its fingerprint is `fingerprint`; MaskMissing otherwise."""
    held = str(state[MASK_INFO]["fingerprint"]) if MASK_INFO in state else ""
    if held != fingerprint:
        raise MaskMissing(fingerprint, held)
    return unpack_parameter_mask(state[MASK_BITS]["bits"].numpy(), model)


@handler(TRAIN_MESSAGE)
def lmf_train(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """A round of the experiment: `teach` = local steps on the training text; `unlearn` = masked forgetting
    (client `lmf.client`) or masked maintenance (the others); reply the update."""
    config = content["config"]
    mode = str(config.get("lmf-mode", "teach"))
    if mode not in MODES:
        raise ValueError(f"train config 'lmf-mode' must be one of {MODES}, got {mode!r}")
    model = receive_lm(content, cfg)
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seed = _seed(cfg, int(config["server-round"]), partition_id)
    text = training_text(cfg, partition_id)
    if mode == "teach":
        loss = local_steps(model, text, cfg, float(config["lr"]), seed)
    else:
        mask = held_mask(state, model, str(config.get("lmf-mask", "")))
        if partition_id == cfg["lmf.client"]:
            loss = forget(model, mask, cfg, partition_id, seed)
        else:
            stream = lm_corpus(cfg).tokenizer.encode_tensor(text)
            loss = maintain(model, mask, client_facts(cfg, partition_id), stream, cfg, seed)
    return lm_reply(model, received, content, {"num-examples": len(text), "train-loss": loss,
                                               "partition-id": partition_id})


@handler(MASK_MESSAGE)
def lmf_mask(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Client `lmf.client` localizes its facts in the received model; the reply is the mask's packed bits."""
    if partition_id != cfg["lmf.client"]:
        raise ValueError(f"partition {partition_id} holds no facts to forget (lmf.client = {cfg['lmf.client']})")
    method = str(content["config"]["localization"])
    model = build_lm(cfg, seed=0)
    model.load_state_dict(content["model"].to_torch_state_dict())
    found = localize(model, cfg, client_facts(cfg, partition_id), method)
    bits = pack_parameter_mask(found.mask, model)
    return RecordDict({"mask": ArrayRecord({"bits": Array(bits)}),
                       "config": ConfigRecord({"localization": found.name, "count": found.parameter_count,
                                               "components": ",".join(str(c) for c in found.components)})})


@handler(INSTALL_MESSAGE)
def lmf_install(content: RecordDict, state: RecordDict, cfg: dict, partition_id: int) -> RecordDict:
    """Store the mask bits in the node state; the reply echoes their fingerprint."""
    bits = np.array(content["mask"]["bits"].numpy(), dtype=np.uint8, copy=True)
    fingerprint = mask_fingerprint(bits)
    state[MASK_BITS] = ArrayRecord({"bits": Array(bits)})
    state[MASK_INFO] = ConfigRecord({"fingerprint": fingerprint})
    return RecordDict({"config": ConfigRecord({"fingerprint": fingerprint})})
