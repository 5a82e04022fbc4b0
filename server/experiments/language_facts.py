"""Federated mechanistic unlearning of facts: a client of the federated char GPT asks that its facts be forgotten,
inside a mask it localizes on its own facts (issue 12, sections 3 and 4; Guo et al., arXiv:2410.12949).

`LMFactsExperiment(cfg)` (registered as EXPERIMENTS["lm-mechanistic"]) has two phases of `train.lmf` rounds
(`client.language_facts`; the lm experiment's model, corpus, speaker partition and local steps):
1. `teach`: `lmf.train-rounds` FedAvg rounds; every client trains on its text with its own facts woven in.
2. `unlearn:<localization>`: at the start client `lmf.client` receives the trained model (`query.lmf_mask`),
   localizes its facts with `lmf.localization` (lookup MLPs by subject-position patching, causal tracing,
   attribution patching, random components - all three matched to the lookup-MLP parameter count - or all MLPs /
   all weights) and replies only the mask, as packed bits; the server sends the bits to every client
   (`query.lmf_install`, stored in the node state). Both exchanges are one-off bytes (`bytes_oneoff`, reported as
   `mask_bytes`). Then `lmf.rounds` rounds: client `lmf.client` runs the library's masked unlearning objective on its
   facts (prompt format `lmf.train-format` only), the others maintain their text and facts inside the same mask;
   FedAvg averages (updates are exactly 0 outside the mask, so the global model there is bit-identical to the taught
   model).

Evaluators after every round: validation loss / perplexity / accuracy (`ValidationEvaluator`, first: `acc/val` is
the run's test_accuracy) and `FactsEvaluator`: greedy accuracy of the forgotten facts per prompt format
(`forget/f<i>`), in the trained format (`forget/trained`) and the mean over the others (`forget/other`), and of the
maintained facts (every other client's; `maintain/trained`, `maintain/mean`). `finish` adds a relearning attack on
the final model (`fedsparse.lm.mechanistic.relearn_attack`: all weights fine-tuned `lmf.relearn-steps` steps on one
half of the forgotten facts, in the trained format; accuracy of the held-out half before / after), the mask (method,
components in rank order, parameter count and fraction) and the bytes.

Invariants: the facts are functions of the config; the mask bits, their description and the one-off bytes are in
`state_dict()` (a resumed phase 2 keeps the mask; clients that lost their state fail the round with MaskMissing -
re-installing on resume is not implemented).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.language import build_lm, client_text, lm_corpus
from client.language_facts import (
    INSTALL_MESSAGE,
    LOCALIZATIONS,
    MASK_MESSAGE,
    TRAIN_MESSAGE,
    client_facts,
    maintained_facts,
    run_facts,
    training_text,
)
from client.unlearning import mask_fingerprint, unpack_parameter_mask
from fedsparse.config import ConfigError
from fedsparse.lm.facts import PROMPT_FORMATS, Fact, fact_accuracy, relearn_split
from fedsparse.lm.mechanistic import mask_count, relearn_attack
from fedsparse.lm.model import GPT
from fedsparse.lm.tokenizer import CharTokenizer
from server.experiments import Phase, PhaseContext
from server.experiments.language import LanguageExperiment, LanguageFedAvg, ValidationEvaluator
from server.experiments.unlearning import exchange_bytes
from server.strategies.base import FedAvg

log = logging.getLogger(__name__)


class LMFactsFedAvg(LanguageFedAvg):
    """FedAvg of `train.lmf` rounds."""

    message_type = TRAIN_MESSAGE


class MaskRequestError(RuntimeError):
    """The forgetting client's mask could not be obtained or installed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class FactsEvaluator:
    """Greedy fact accuracies of the global LM (module docstring)."""

    forgotten: tuple[Fact, ...]
    maintained: tuple[Fact, ...]
    tokenizer: CharTokenizer
    train_format: int

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """{"forget/f<i>", "forget/trained", "forget/other", "maintain/trained", "maintain/mean"} of `model`."""
        formats = range(len(PROMPT_FORMATS))
        forget = [fact_accuracy(model, self.tokenizer, self.forgotten, i) for i in formats]
        kept = [fact_accuracy(model, self.tokenizer, self.maintained, i) for i in formats]
        others = [v for i, v in enumerate(forget) if i != self.train_format]
        return {**{f"forget/f{i}": v for i, v in enumerate(forget)},
                "forget/trained": forget[self.train_format], "forget/other": float(np.mean(others)),
                "maintain/trained": kept[self.train_format], "maintain/mean": float(np.mean(kept))}


class LMFactsExperiment:
    """Teach the federated char GPT every client's facts, then forget one client's inside a localized mask."""

    config_namespaces: frozenset[str] = frozenset({"lm", "lmf"})
    uses_dataset = False

    def __init__(self, cfg: dict) -> None:
        self.check_config(cfg)
        self.cfg = cfg
        corpus = lm_corpus(cfg)
        self.model: GPT = build_lm(cfg, seed=cfg["seed"])
        self.val_stream = corpus.tokenizer.encode_tensor(corpus.val)
        self.forgotten = client_facts(cfg, cfg["lmf.client"])
        self.mask_bits: np.ndarray | None = None
        self.mask_info: dict = {}
        self.oneoff = {"down": 0, "up": 0}
        evaluators = [ValidationEvaluator(self.val_stream, cfg["lm.eval-windows"]),
                      FactsEvaluator(self.forgotten, maintained_facts(cfg), corpus.tokenizer,
                                     cfg["lmf.train-format"])]
        arguments = FedAvg.config_arguments(cfg)
        teach, unlearn = LMFactsFedAvg(maskable=[], **arguments), LMFactsFedAvg(maskable=[], **arguments)
        for strategy in (teach, unlearn):
            strategy.max_examples = sum(len(training_text(cfg, c)) for c in range(cfg["num-clients"]))
        self.phases: list[Phase] = [
            Phase(name="teach", task=cfg["dataset"], rounds=cfg["lmf.train-rounds"], strategy=teach,
                  evaluators=evaluators, client_config={"lmf-mode": "teach"}),
            Phase(name=f"unlearn:{cfg['lmf.localization']}", task=cfg["dataset"], rounds=cfg["lmf.rounds"],
                  strategy=unlearn, evaluators=evaluators, client_config={"lmf-mode": "unlearn", "lmf-mask": ""},
                  on_start=self.on_start),
        ]

    @staticmethod
    def check_config(cfg: dict) -> None:
        """ConfigError naming the key when the settings cannot host the experiment: the lm experiment's checks, a
        forgetting client that does not exist, a prompt format that does not exist, lookup layers beyond the model,
        fact prompts longer than the context."""
        LanguageExperiment.check_config(cfg)
        if cfg["lmf.client"] >= cfg["num-clients"]:
            raise ConfigError(f"config key 'lmf.client': {cfg['lmf.client']} is not a partition of "
                              f"num-clients={cfg['num-clients']}")
        if cfg["lmf.train-format"] >= len(PROMPT_FORMATS):
            raise ConfigError(f"config key 'lmf.train-format': there are {len(PROMPT_FORMATS)} prompt formats, got "
                              f"{cfg['lmf.train-format']}")
        if cfg["lmf.lookup-layers"] > cfg["lm.layers"]:
            raise ConfigError(f"config key 'lmf.lookup-layers': the model has lm.layers={cfg['lm.layers']} MLPs, "
                              f"got {cfg['lmf.lookup-layers']}")
        longest = max(len(PROMPT_FORMATS[i].format(subject=f.subject)) + len(f.attribute) + 3
                      for f in run_facts(cfg) for i in range(len(PROMPT_FORMATS)))
        if longest > cfg["lm.block-size"]:
            raise ConfigError(f"config key 'lm.block-size': a fact line needs {longest} characters of context, got "
                              f"{cfg['lm.block-size']}")

    def _exchange(self, ctx: PhaseContext, nodes: dict[int, int], content: RecordDict, message_type: str
                  ) -> dict[int, RecordDict]:
        before = exchange_bytes(ctx.grid, message_type)
        answers = ctx.exchange([Message(content, dst_node_id=node, message_type=message_type)
                                for _, node in sorted(nodes.items())])
        spent = exchange_bytes(ctx.grid, message_type) - before
        self.oneoff["down"] += spent.down
        self.oneoff["up"] += spent.up
        return answers

    def on_start(self, ctx: PhaseContext) -> None:
        """The request: the forgetting client's mask of the trained model, installed on every client."""
        holder = self.cfg["lmf.client"]
        if holder not in ctx.nodes:
            raise MaskRequestError(f"the forgetting client (partition {holder}) is not connected: it alone holds its "
                                   "facts")
        content = RecordDict({"model": ctx.arrays,
                              "config": ConfigRecord({"localization": self.cfg["lmf.localization"]})})
        reply = self._exchange(ctx, {holder: ctx.nodes[holder]}, content, MASK_MESSAGE).get(ctx.nodes[holder])
        if reply is None:
            raise MaskRequestError("the forgetting client sent no mask")
        bits = np.array(reply["mask"]["bits"].numpy(), dtype=np.uint8, copy=True)
        mask = unpack_parameter_mask(bits, self.model)  # ValueError on a wrong size
        info = reply["config"]
        self.mask_bits = bits
        self.mask_info = {"localization": str(info["localization"]), "components": str(info["components"]),
                          "parameters": mask_count(mask), "fraction": mask_count(mask) / self.model.num_parameters(),
                          "packed_bytes": int(bits.nbytes)}
        fingerprint = mask_fingerprint(bits)
        install = RecordDict({"mask": ArrayRecord({"bits": Array(bits)})})
        answers = self._exchange(ctx, ctx.nodes, install, INSTALL_MESSAGE)
        confirmed = sum(str(a["config"]["fingerprint"]) == fingerprint for a in answers.values())
        if confirmed < len(ctx.nodes):
            log.warning("lmf mask %s installed on %d of %d clients", fingerprint, confirmed, len(ctx.nodes))
        self.phases[1].client_config["lmf-mask"] = fingerprint
        log.info("lmf: %s mask of %d parameters (%.4f) installed", self.mask_info["localization"],
                 self.mask_info["parameters"], self.mask_info["fraction"])

    def state_dict(self) -> dict:
        """The mask bits, their description and the one-off bytes."""
        return {"mask-bits": self.mask_bits, "mask-info": dict(self.mask_info), "oneoff": dict(self.oneoff)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved (the unlearning rounds name the restored mask's fingerprint)."""
        self.mask_bits = state.get("mask-bits")
        self.mask_info = dict(state.get("mask-info", {}))
        self.oneoff = dict(state.get("oneoff", {"down": 0, "up": 0}))
        if self.mask_bits is not None:
            self.phases[1].client_config["lmf-mask"] = mask_fingerprint(self.mask_bits)

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """Before / after fact accuracies and perplexity, the relearning attack, the mask and the bytes."""
        model = build_lm(self.cfg, seed=0)
        model.load_state_dict(torch.load(Path(out_dir) / "final_model.pt"))
        keys = ("forget/trained", "forget/other", "maintain/trained", "maintain/mean", "ppl/val",
                *(f"forget/f{i}" for i in range(len(PROMPT_FORMATS))))
        taught = [r for r in rows if r.get("phase") == "teach"]
        phase_rows = [r for r in rows if r.get("phase") == self.phases[1].name]
        extra: dict = {"lmf_localization": self.cfg["lmf.localization"], "lmf_client": self.cfg["lmf.client"],
                       "forgotten_facts": len(self.forgotten), "parameters": model.num_parameters(),
                       "mask": dict(self.mask_info), "mask_bytes": dict(self.oneoff)}
        if taught:
            extra["before"] = {k: float(taught[-1][k]) for k in keys}
        if phase_rows:
            extra["after"] = {k: float(phase_rows[-1][k]) for k in keys}
        split = relearn_split(self.forgotten, self.cfg["seed"])
        corpus = lm_corpus(self.cfg)
        stream = corpus.tokenizer.encode_tensor(client_text(self.cfg, self.cfg["lmf.client"]))
        attack = relearn_attack(model, corpus.tokenizer, split, stream, steps=self.cfg["lmf.relearn-steps"],
                                lr=self.cfg["lmf.relearn-lr"], train_format=self.cfg["lmf.train-format"],
                                seed=self.cfg["seed"])
        extra["relearn"] = {"heldout_before": list(attack.before), "heldout_after": list(attack.after),
                            "relearned_after": list(attack.relearned), "heldout_facts": len(split.heldout)}
        extra["unlearn_rounds"] = len(phase_rows)
        extra["unlearn_bytes"] = sum(int(r["bytes_down"]) + int(r["bytes_up"]) for r in phase_rows)
        return extra


__all__ = ["LOCALIZATIONS", "FactsEvaluator", "LMFactsExperiment", "LMFactsFedAvg", "MaskRequestError"]
