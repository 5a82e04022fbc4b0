"""Synthetic subject -> attribute facts for the character LM (issue 12, section 3).

Invented subjects (pronounceable random names) are each given one attribute (a sport) and rendered in several prompt
formats; a model that knows the fact completes every prompt with the attribute followed by ".".

Invariants:
- Everything is seeded: the same arguments give the same facts, splits and training text.
- Subjects are distinct; attributes have pairwise distinct first characters, so the first character the model
  predicts after a prompt identifies the attribute (the mechanistic measures score that single character).
- A rendered fact line is `"\\n" + prompt + attribute + ".\\n"`: prompts are evaluated after a leading newline,
  exactly as they appear in the training text.
- `FactSplits.forget` and `FactSplits.maintain` are disjoint; `RelearnSplit.relearn` and `RelearnSplit.heldout` are
  disjoint and together are exactly the forgotten facts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedsparse.lm.model import GPT, generate
from fedsparse.lm.tokenizer import CharTokenizer
from fedsparse.lm.train import TrainConfig, TrainResult, train_lm

SPORTS: tuple[str, ...] = ("tennis", "golf", "rugby", "hockey", "baseball", "cricket")
PROMPT_FORMATS: tuple[str, ...] = ("{subject} plays ", "The sport of {subject} is ", "Q: {subject}? A: ")
ATTRIBUTE_END = "."
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Fact:
    """One subject and its attribute."""

    subject: str
    attribute: str


@dataclass(frozen=True)
class FactSplits:
    """The facts a model is taught, the ones to forget or edit, and the ones it must keep (disjoint)."""

    forget: tuple[Fact, ...]
    maintain: tuple[Fact, ...]

    @property
    def all(self) -> tuple[Fact, ...]:
        """Forget then maintain facts."""
        return self.forget + self.maintain


@dataclass(frozen=True)
class RelearnSplit:
    """The forgotten facts split for a relearning attack: retrain on `relearn`, measure recovery on `heldout`."""

    relearn: tuple[Fact, ...]
    heldout: tuple[Fact, ...]


def check_attributes(attributes: Sequence[str]) -> None:
    """Raise ValueError unless the attributes are non-empty and have pairwise distinct first characters."""
    if len(attributes) < 2 or any(not attribute for attribute in attributes):
        raise ValueError(f"need at least two non-empty attributes, got {list(attributes)}")
    firsts = [attribute[0] for attribute in attributes]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"attributes must have distinct first characters, got {list(attributes)}")


def invent_name(rng: random.Random) -> str:
    """A capitalised name of 2-3 consonant-vowel syllables, e.g. 'Tovaki'."""
    syllables = rng.randint(2, 3)
    name = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
    return name.capitalize()


def make_facts(count: int, attributes: Sequence[str] = SPORTS, seed: int = 0) -> list[Fact]:
    """`count` facts with distinct invented subjects; attributes cycle through `attributes` (balanced), shuffled."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    check_attributes(attributes)
    rng = random.Random(seed)
    subjects: list[str] = []
    seen: set[str] = set()
    while len(subjects) < count:
        name = invent_name(rng)
        if name not in seen:
            seen.add(name)
            subjects.append(name)
    labels = [attributes[i % len(attributes)] for i in range(count)]
    rng.shuffle(labels)
    return [Fact(subject, label) for subject, label in zip(subjects, labels)]


def split_facts(facts: Sequence[Fact], forget_count: int, seed: int = 0) -> FactSplits:
    """A seeded random choice of `forget_count` facts to forget; the rest are maintained."""
    if not 0 < forget_count < len(facts):
        raise ValueError(f"forget_count must be in (0, {len(facts)}), got {forget_count}")
    order = list(range(len(facts)))
    random.Random(seed).shuffle(order)
    forget = tuple(facts[i] for i in sorted(order[:forget_count]))
    maintain = tuple(facts[i] for i in sorted(order[forget_count:]))
    return FactSplits(forget=forget, maintain=maintain)


def relearn_split(forgotten: Sequence[Fact], seed: int = 0) -> RelearnSplit:
    """Split the forgotten facts into two halves (the first gets the extra one when the count is odd)."""
    if len(forgotten) < 2:
        raise ValueError(f"need at least 2 forgotten facts to split, got {len(forgotten)}")
    order = list(range(len(forgotten)))
    random.Random(seed).shuffle(order)
    half = (len(forgotten) + 1) // 2
    return RelearnSplit(
        relearn=tuple(forgotten[i] for i in sorted(order[:half])),
        heldout=tuple(forgotten[i] for i in sorted(order[half:])),
    )


def render_prompt(subject: str, format_index: int) -> str:
    """The prompt of format `format_index` for `subject`, preceded by a newline (as in the training text)."""
    if not 0 <= format_index < len(PROMPT_FORMATS):
        raise ValueError(f"format_index must be in [0, {len(PROMPT_FORMATS)}), got {format_index}")
    return "\n" + PROMPT_FORMATS[format_index].format(subject=subject)


def render_fact(fact: Fact, format_index: int, attribute: str | None = None) -> str:
    """The full line: prompt, attribute (or `attribute` instead of the fact's own), '.', newline."""
    return render_prompt(fact.subject, format_index) + (attribute or fact.attribute) + ATTRIBUTE_END + "\n"


def subject_span(fact: Fact, format_index: int) -> range:
    """Character positions of the subject inside `render_prompt(fact.subject, format_index)`."""
    start = 1 + PROMPT_FORMATS[format_index].index("{subject}")
    return range(start, start + len(fact.subject))


def facts_text(
    facts: Sequence[Fact], corpus: str, repeats: int, seed: int = 0, corpus_chunk: int = 200,
    formats: Sequence[int] | None = None,
) -> str:
    """Training text: every fact in every format `repeats` times, shuffled, each line after a corpus chunk.

    Corpus chunks of `corpus_chunk` characters are taken in order (wrapping around) so the model keeps modelling
    ordinary text while it learns the facts.
    """
    if repeats < 1 or corpus_chunk < 0:
        raise ValueError(f"repeats must be >= 1 and corpus_chunk >= 0, got {repeats}, {corpus_chunk}")
    format_indices = range(len(PROMPT_FORMATS)) if formats is None else formats
    lines = [render_fact(fact, index) for fact in facts for index in format_indices for _ in range(repeats)]
    random.Random(seed).shuffle(lines)
    parts: list[str] = []
    offset = 0
    for line in lines:
        if corpus_chunk and corpus:
            chunk = (corpus + corpus)[offset:offset + corpus_chunk]
            offset = (offset + corpus_chunk) % len(corpus)
            parts.append(chunk)
        parts.append(line)
    return "".join(parts)


def teach_facts(
    model: GPT, tokenizer: CharTokenizer, facts: Sequence[Fact], corpus: str, config: TrainConfig,
    repeats: int = 50, corpus_chunk: int = 200, val_stream: torch.Tensor | None = None,
) -> TrainResult:
    """Train `model` in place on `facts_text(facts, corpus, repeats)` with `train_lm`."""
    text = facts_text(facts, corpus, repeats, seed=config.seed, corpus_chunk=corpus_chunk)
    return train_lm(model, tokenizer.encode_tensor(text), config, val_stream=val_stream)


@torch.no_grad()
def complete_prompts(model: GPT, tokenizer: CharTokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations (the new characters only) of each prompt; prompts of equal length are batched."""
    by_length: dict[int, list[int]] = {}
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    completions = [""] * len(prompts)
    for length, indices in by_length.items():
        batch = torch.tensor([encoded[i] for i in indices], dtype=torch.long)
        output = generate(model, batch, max_new_tokens)
        for row, index in enumerate(indices):
            completions[index] = tokenizer.decode(output[row, length:])
    return completions


def fact_accuracy(
    model: GPT, tokenizer: CharTokenizer, facts: Sequence[Fact], format_index: int,
    targets: Sequence[str] | None = None,
) -> float:
    """Fraction of facts whose greedy completion starts with the attribute (or `targets[i]`) followed by '.'."""
    if not facts:
        raise ValueError("no facts to score")
    expected = [fact.attribute for fact in facts] if targets is None else list(targets)
    if len(expected) != len(facts):
        raise ValueError(f"{len(expected)} targets for {len(facts)} facts")
    longest = max(len(target) for target in expected) + len(ATTRIBUTE_END)
    prompts = [render_prompt(fact.subject, format_index) for fact in facts]
    completions = complete_prompts(model, tokenizer, prompts, longest)
    hits = sum(completion.startswith(target + ATTRIBUTE_END) for completion, target in zip(completions, expected))
    return hits / len(facts)
