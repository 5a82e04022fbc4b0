"""Forget sets, per-example memorization and difficulty, and gradient-ascent unlearning traced over steps.

Definitions (all losses are mean next-token cross-entropy over an example's characters, in nats, with the example
scored on its own, without preceding context):

- forget set: examples that were in the target model's training text. In-distribution (ID): passages of the corpus;
  out-of-distribution (OOD): canaries inserted into the training text (random characters, digit strings,
  code-like lines). Each forget set carries `holdout` twins: examples of the same kind and length that no model
  was trained on (ID: passages of the validation text; OOD: canaries of the same generator, never inserted).
- exact extraction: greedy decoding from the first `prefix_len` characters reproduces the rest exactly.
- difficulty: the loss under a reference model never trained on the example.
- memorization: reference loss / target loss (> 1: the target finds the example easier than a model that never
  saw it).
- unlearning quality (see `forget_quality`): how well an attacker thresholding the model's per-example loss can
  tell the forget set from its never-trained twins, turned into an (epsilon, delta) estimate with the
  hypothesis-testing bound used in the NeurIPS 2023 unlearning challenge, and scored H(eps) = 2^-floor(2 eps).
  quality 1: indistinguishable from never-trained data; 0: perfectly separable, in either direction (a forget set
  pushed to a far higher loss than its twins is as detectable as a memorized one).
"""

from __future__ import annotations

import copy
import math
import random
import string
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from fedsparse.lm.corpus import parse_turns
from fedsparse.lm.model import GPT, generate, next_token_loss
from fedsparse.lm.tokenizer import CharTokenizer
from fedsparse.lm.train import evaluate

CANARY_KINDS = ("random", "digits", "code")
CANARY_ALPHABET = string.ascii_letters + string.digits + "#@%*+=<>[]{}/|~^"  # of "random" canaries
_CODE_NAMES = ["x", "y", "idx", "buf", "acc", "tmp", "val", "key", "ptr", "res"]
_CODE_OPS = ["+", "-", "*", "//", "%", "^", "&", "|"]


@dataclass(frozen=True)
class ForgetSet:
    """Examples to forget (all in training) and same-kind twins never trained on."""

    name: str
    in_distribution: bool
    examples: list[str]
    holdout: list[str]

    def __post_init__(self) -> None:
        if not self.examples or not self.holdout:
            raise ValueError(f"forget set {self.name!r} needs examples and holdout twins")


def corpus_passages(text: str, count: int, length: int, seed: int = 0) -> list[str]:
    """`count` distinct passages of exactly `length` characters, each opening a speaker turn, drawn with `seed`."""
    if count < 1 or length < 2:
        raise ValueError(f"count must be >= 1 and length >= 2, got {count}, {length}")
    starts = sorted({t.start for t in parse_turns(text) if t.end - t.start >= length})
    candidates = sorted({text[s:s + length] for s in starts})
    if len(candidates) < count:
        raise ValueError(f"only {len(candidates)} turns of >= {length} characters, asked for {count}")
    return random.Random(seed).sample(candidates, count)


def make_canaries(kind: str, count: int, length: int, seed: int = 0) -> list[str]:
    """`count` distinct canaries of exactly `length` characters.

    random: uniform over letters, digits and punctuation; digits: uniform digits with a space every 4;
    code: short Python-like assignments (`acc = idx * 37;`) joined by spaces.
    """
    if kind not in CANARY_KINDS:
        raise ValueError(f"canary kind must be one of {CANARY_KINDS}, got {kind!r}")
    if count < 1 or length < 2:
        raise ValueError(f"count must be >= 1 and length >= 2, got {count}, {length}")
    rng = random.Random(f"{kind}-{seed}")
    canaries: list[str] = []
    seen: set[str] = set()
    while len(canaries) < count:
        if kind == "random":
            canary = "".join(rng.choice(CANARY_ALPHABET) for _ in range(length))
        elif kind == "digits":
            canary = "".join(" " if i % 5 == 4 else rng.choice(string.digits) for i in range(length))
        else:
            pieces = []
            while sum(len(p) + 1 for p in pieces) < length:
                lhs, rhs = rng.sample(_CODE_NAMES, 2)
                pieces.append(f"{lhs} = {rhs} {rng.choice(_CODE_OPS)} {rng.randint(0, 999)};")
            canary = " ".join(pieces)[:length]
        if canary not in seen:
            seen.add(canary)
            canaries.append(canary)
    return canaries


def insert_sequences(text: str, sequences: list[str], repeats: int, seed: int = 0) -> str:
    """`text` with each sequence inserted `repeats` times, each copy as its own paragraph at a random blank line."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    boundaries = [i + 2 for i in range(len(text) - 1) if text.startswith("\n\n", i)]
    if not boundaries:
        raise ValueError("text has no blank line to insert at")
    rng = random.Random(seed)
    insertions: dict[int, list[str]] = defaultdict(list)
    for sequence in sequences:
        for _ in range(repeats):
            insertions[rng.choice(boundaries)].append(sequence + "\n\n")
    pieces, previous = [], 0
    for position in sorted(insertions):
        pieces.append(text[previous:position])
        pieces.extend(insertions[position])
        previous = position
    pieces.append(text[previous:])
    return "".join(pieces)


def remove_sequences(text: str, sequences: list[str]) -> str:
    """`text` with every occurrence of every sequence cut out (to build a reference model's training text)."""
    for sequence in sequences:
        text = text.replace(sequence, "")
    return text


def _by_length(texts: list[str]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for index, text in enumerate(texts):
        groups[len(text)].append(index)
    return groups


def _check_fits(model: GPT, texts: list[str]) -> None:
    longest = max((len(t) for t in texts), default=0)
    if longest > model.config.block_size + 1:
        raise ValueError(f"example of {longest} characters exceeds block_size + 1 = {model.config.block_size + 1}")


@torch.no_grad()
def sequence_losses(model: GPT, tokenizer: CharTokenizer, texts: list[str]) -> np.ndarray:
    """Mean next-token loss of each text on its own (nats/char), in eval mode."""
    _check_fits(model, texts)
    was_training = model.training
    model.eval()
    losses = np.empty(len(texts))
    for indices in _by_length(texts).values():
        batch = torch.stack([tokenizer.encode_tensor(texts[i]) for i in indices])
        losses[indices] = next_token_loss(model, batch, reduction="none").mean(dim=1).numpy()
    model.train(was_training)
    return losses


@torch.no_grad()
def exact_extraction(model: GPT, tokenizer: CharTokenizer, texts: list[str], prefix_len: int) -> np.ndarray:
    """Whether greedy decoding from each text's first `prefix_len` characters reproduces the rest exactly."""
    _check_fits(model, texts)
    extracted = np.zeros(len(texts), dtype=bool)
    for length, indices in _by_length(texts).items():
        if not 1 <= prefix_len < length:
            raise ValueError(f"prefix_len must be in [1, {length}), got {prefix_len}")
        batch = torch.stack([tokenizer.encode_tensor(texts[i]) for i in indices])
        continued = generate(model, batch[:, :prefix_len], length - prefix_len)
        extracted[indices] = (continued == batch).all(dim=1).numpy()
    return extracted


@dataclass(frozen=True)
class ExampleMeasures:
    """Per-example memorization (`reference_loss / target_loss`), difficulty and exact extraction."""

    text: str
    target_loss: float
    reference_loss: float
    extracted: bool

    @property
    def memorization(self) -> float:
        """Reference loss over target loss; > 1 when the target has learned the example beyond the reference."""
        return self.reference_loss / self.target_loss

    @property
    def difficulty(self) -> float:
        """Loss under the reference model that was never trained on the example."""
        return self.reference_loss


def measure_examples(
    target: GPT, reference: GPT, tokenizer: CharTokenizer, texts: list[str], prefix_len: int
) -> list[ExampleMeasures]:
    """Memorization, difficulty and extraction of each text for a target model and a never-trained reference."""
    target_losses = sequence_losses(target, tokenizer, texts)
    reference_losses = sequence_losses(reference, tokenizer, texts)
    extracted = exact_extraction(target, tokenizer, texts, prefix_len)
    return [
        ExampleMeasures(text, float(t), float(r), bool(e))
        for text, t, r, e in zip(texts, target_losses, reference_losses, extracted, strict=True)
    ]


@dataclass(frozen=True)
class ForgetQuality:
    """Loss-threshold distinguishability of a forget set from never-trained twins.

    epsilon: max over thresholds of the (epsilon, delta) hypothesis-testing bound (inf when perfectly separable);
    epsilon_max: ceil(ln(n - 1)) for n = the smaller of the two set sizes, the largest epsilon finite samples
    resolve; quality: 2^-floor(2 epsilon), or 0 when epsilon >= epsilon_max; auc: ROC AUC of "lower loss means
    trained on" (0.5 indistinguishable, 1 memorized, below 0.5 pushed past the twins).
    """

    epsilon: float
    epsilon_max: float
    quality: float
    auc: float


def forget_quality(forget_losses: np.ndarray, holdout_losses: np.ndarray, delta: float = 1e-5) -> ForgetQuality:
    """Distinguishability of per-example losses on the forget set from those on never-trained twins.

    Every threshold t on the loss defines a test "trained on it if loss <= t" (or ">= t" when the forget set's median
    loss is above the twins', so over-unlearning counts too), with false-positive rate FPR (twins called trained
    on) and false-negative rate FNR (forget examples missed). Its epsilon is
    max(log(1 - delta - FPR) - log(FNR), log(1 - delta - FNR) - log(FPR)), clipped at 0 (Kairouz et al. 2015).
    Thresholds where exactly one rate is 0 are skipped (too few samples to bound the ratio); both 0 means perfect
    separation, epsilon = inf.
    """
    forget_losses = np.asarray(forget_losses, dtype=float)
    holdout_losses = np.asarray(holdout_losses, dtype=float)
    smaller = min(forget_losses.size, holdout_losses.size)
    if smaller < 3:
        raise ValueError("forget_quality needs at least 3 forget examples and 3 twins")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    labels = np.concatenate([np.ones(forget_losses.size), np.zeros(holdout_losses.size)])
    scores = -np.concatenate([forget_losses, holdout_losses])
    auc = float(roc_auc_score(labels, scores))
    # The test's direction follows the medians, as in the challenge: "trained on if loss <= t" when the forget set
    # sits lower, "if loss >= t" when unlearning has pushed it above its twins.
    direction = 1.0 if np.median(forget_losses) <= np.median(holdout_losses) else -1.0
    fpr, tpr, _ = roc_curve(labels, direction * scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    epsilon = 0.0
    for false_pos, false_neg in zip(fpr, fnr, strict=True):
        if false_pos == 0.0 and false_neg == 0.0:
            epsilon = math.inf
            break
        if false_pos == 0.0 or false_neg == 0.0:
            continue
        bound = max(
            math.log(max(1.0 - delta - false_pos, 1e-300)) - math.log(false_neg),
            math.log(max(1.0 - delta - false_neg, 1e-300)) - math.log(false_pos),
        )
        epsilon = max(epsilon, bound)
    epsilon_max = float(math.ceil(math.log(smaller - 1)))
    quality = 0.0 if epsilon >= epsilon_max else 2.0 ** -math.floor(2 * epsilon)
    return ForgetQuality(epsilon=epsilon, epsilon_max=epsilon_max, quality=quality, auc=auc)


@dataclass(frozen=True)
class UnlearnConfig:
    """Gradient ascent on the forget set: full-batch Adam steps on -loss, evaluated every `eval_every` steps."""

    steps: int = 100
    lr: float = 1e-4
    eval_every: int = 5
    val_windows: int = 32

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.eval_every < 1 or self.val_windows < 1:
            raise ValueError(f"invalid UnlearnConfig: {self}")


@dataclass(frozen=True)
class TracePoint:
    """The state of an unlearning run after `step` ascent steps."""

    step: int
    forget_loss: float
    holdout_loss: float
    epsilon: float
    quality: float
    auc: float
    extraction_rate: float
    val_loss: float

    @property
    def val_perplexity(self) -> float:
        """exp(val_loss)."""
        return math.exp(self.val_loss)


def _trace_point(
    step: int, model: GPT, tokenizer: CharTokenizer, forget: ForgetSet, val_stream: torch.Tensor,
    prefix_len: int, val_windows: int,
) -> TracePoint:
    forget_losses = sequence_losses(model, tokenizer, forget.examples)
    holdout_losses = sequence_losses(model, tokenizer, forget.holdout)
    quality = forget_quality(forget_losses, holdout_losses)
    extracted = exact_extraction(model, tokenizer, forget.examples, prefix_len)
    return TracePoint(
        step=step,
        forget_loss=float(forget_losses.mean()),
        holdout_loss=float(holdout_losses.mean()),
        epsilon=quality.epsilon,
        quality=quality.quality,
        auc=quality.auc,
        extraction_rate=float(extracted.mean()),
        val_loss=evaluate(model, val_stream, val_windows).loss,
    )


def gradient_ascent_trace(
    model: GPT,
    tokenizer: CharTokenizer,
    forget: ForgetSet,
    val_stream: torch.Tensor,
    config: UnlearnConfig,
    prefix_len: int,
) -> list[TracePoint]:
    """Unlearn `forget` from a copy of `model` by gradient ascent; the trace starts at step 0 (before any step).

    `model` itself is left unchanged. Forget examples of unequal lengths are ascended one length group at a time
    within each step (their losses summed, weighted by group size).
    """
    _check_fits(model, forget.examples)
    student = copy.deepcopy(model)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    groups = [torch.stack([tokenizer.encode_tensor(forget.examples[i]) for i in indices])
              for indices in _by_length(forget.examples).values()]
    total = len(forget.examples)
    trace = [_trace_point(0, student, tokenizer, forget, val_stream, prefix_len, config.val_windows)]
    for step in range(1, config.steps + 1):
        student.train()
        optimizer.zero_grad(set_to_none=True)
        ascent = sum(-next_token_loss(student, batch) * (batch.shape[0] / total) for batch in groups)
        ascent.backward()
        optimizer.step()
        if step % config.eval_every == 0 or step == config.steps:
            trace.append(_trace_point(step, student, tokenizer, forget, val_stream, prefix_len, config.val_windows))
    return trace
