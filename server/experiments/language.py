"""The language-model experiment: a nanoGPT-style character LM trained on tiny-shakespeare by federated rounds.

`LanguageExperiment(cfg)` (registered as EXPERIMENTS["lm"]) has one phase of `num-rounds` FedAvg rounds whose train
messages are `train.lm` (`client.language`): every client holds the turns of its own speakers (a non-IID text
partition) and runs `lm.local-steps` AdamW steps on them; the server averages the updates (example weights =
characters of text) and scores the global model on the held-out validation text after every round.

Metrics (rounds.csv, summary.json): `loss/val` (mean next-character cross-entropy, nats), `ppl/val` (its
exponential) and `acc/val` (share of characters whose most likely prediction is right; it is the run's
`test_accuracy`, so the usual progress line, plots and `fedsparse report` work unchanged). `finish` adds the final
validation loss and perplexity, a greedy and a temperature-0.8 sample from a fixed prompt, and the partition
(speakers and characters per client).

The run's `dataset` / `model` keys are not used (`uses_dataset = False`: the image checks before Ray are skipped);
`lm.*` keys size the model and the local work. Invariants: the tokenizer is built from the whole corpus, so server
and clients agree on it; the initial model is `build_lm(cfg, seed)`; nothing here keeps state of its own, so the
runner's checkpoint (global model, rows, strategy) is a complete resume point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from client.language import TRAIN_MESSAGE, build_lm, lm_corpus
from fedsparse.config import ConfigError
from fedsparse.lm.model import GPT, generate
from fedsparse.lm.train import evaluate
from server.experiments import Phase
from server.strategies.base import FedAvg

SAMPLE_PROMPT = "ROMEO:\n"


class LanguageFedAvg(FedAvg):
    """FedAvg whose train messages are `train.lm`: dense rounds of the char GPT."""

    message_type = TRAIN_MESSAGE


@dataclass
class ValidationEvaluator:
    """Next-character loss, perplexity and accuracy of the global LM on the first `windows` windows of the
    validation text."""

    stream: torch.Tensor
    windows: int

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """{"acc/val", "loss/val", "ppl/val"} of `model` (holding the global weights)."""
        result = evaluate(model, self.stream, max_windows=self.windows)
        return {"acc/val": result.accuracy, "loss/val": result.loss, "ppl/val": result.perplexity}


def sample(model: GPT, cfg: dict, temperature: float, chars: int) -> str:
    """`chars` characters generated from `SAMPLE_PROMPT` (greedy at temperature 0; seeded otherwise)."""
    tokenizer = lm_corpus(cfg).tokenizer
    prompt = tokenizer.encode_tensor(SAMPLE_PROMPT).unsqueeze(0)
    generator = torch.Generator().manual_seed(cfg["seed"])
    tokens = generate(model, prompt, chars, temperature=temperature, generator=generator)
    return tokenizer.decode(tokens[0, prompt.shape[1]:])


class LanguageExperiment:
    """One phase of FedAvg rounds of the char GPT over speaker-partitioned text (module docstring)."""

    config_namespaces: frozenset[str] = frozenset({"lm"})
    uses_dataset = False

    def __init__(self, cfg: dict) -> None:
        self.check_config(cfg)
        self.cfg = cfg
        corpus = lm_corpus(cfg)
        self.model: GPT = build_lm(cfg, seed=cfg["seed"])
        self.val_stream = corpus.tokenizer.encode_tensor(corpus.val)
        strategy = LanguageFedAvg(maskable=[], **FedAvg.config_arguments(cfg))
        strategy.max_examples = len(corpus.train)
        self.phases: list[Phase] = [
            Phase(name="train", task=cfg["dataset"], rounds=cfg["num-rounds"], strategy=strategy,
                  evaluators=[ValidationEvaluator(self.val_stream, cfg["lm.eval-windows"])]),
        ]

    @staticmethod
    def check_config(cfg: dict) -> None:
        """ConfigError naming the key when the settings cannot host the experiment: another strategy than fedavg,
        a shape the transformer refuses, more clients than speakers, a client text shorter than one window.
        `fedsparse run` calls it before Ray starts."""
        if cfg["strategy"] != "fedavg":
            raise ConfigError(f"config key 'strategy': the lm experiment runs fedavg, got {cfg['strategy']!r}")
        if cfg["lm.embd"] % cfg["lm.heads"]:
            raise ConfigError(f"config key 'lm.heads': must divide lm.embd={cfg['lm.embd']}, got {cfg['lm.heads']}")
        try:
            corpus = lm_corpus(cfg)
        except ValueError as err:  # partition_by_speaker: fewer speakers than clients
            raise ConfigError(f"config key 'num-clients': {err}") from err
        shortest = min(corpus.partition.client_chars(c) for c in range(cfg["num-clients"]))
        if shortest < cfg["lm.block-size"] + 1:
            raise ConfigError(f"config key 'num-clients': the smallest client holds {shortest} characters, less than "
                              f"one window of lm.block-size + 1 = {cfg['lm.block-size'] + 1}")

    def state_dict(self) -> dict:
        """Nothing to keep: the global model and the strategy are checkpointed by the runner."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""

    def finish(self, out_dir: Path, rows: list[dict]) -> dict:
        """Final validation loss / perplexity / accuracy, two samples, and the partition."""
        final_path = Path(out_dir) / "final_model.pt"
        model = build_lm(self.cfg, seed=0)
        model.load_state_dict(torch.load(final_path))
        scores = ValidationEvaluator(self.val_stream, self.cfg["lm.eval-windows"])(model)
        partition = lm_corpus(self.cfg).partition
        chars = self.cfg["lm.sample-chars"]
        return {
            "val_loss": scores["loss/val"], "val_perplexity": scores["ppl/val"], "val_accuracy": scores["acc/val"],
            "parameters": model.num_parameters(),
            "samples": {"prompt": SAMPLE_PROMPT, "greedy": sample(model, self.cfg, 0.0, chars),
                        "temperature_0.8": sample(model, self.cfg, 0.8, chars)},
            "partition": {"speakers": [len(s) for s in partition.client_speakers],
                          "characters": [partition.client_chars(c) for c in range(partition.num_clients)]},
        }
