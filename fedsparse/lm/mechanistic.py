"""Mechanistic localization of facts in the character LM, and unlearning / editing through a parameter mask.

After Guo et al., "Mechanistic Unlearning" (arXiv:2410.12949; `/work/shared/reference/unlearning.md`, section D),
scaled down to a char-level GPT. A *component* is one layer's attention block (`blocks.L.attn.*`) or MLP
(`blocks.L.mlp.*`). Localizations rank components and turn them into a parameter mask:

- `lookup_mlps`: activation patching of each MLP's output **at the subject positions**, from a clean run into a run
  whose subject characters are corrupted; the MLPs whose restoration recovers the attribute most are the
  fact-lookup MLPs (input side).
- `causal_tracing`: the same restoration, of every component, **at the last prompt position** (output side).
- `attribution_patching`: the first-order estimate grad x (clean - corrupt activation), summed over positions.
- `random`: components in a seeded random order; `all_mlps`; `all_weights`.

Invariants:
- The patching metric is the log-probability of the attribute's first character at the last prompt position (the
  attributes have distinct first characters, see `fedsparse.lm.facts`). Patching a run with its own activations
  changes nothing: the effect is exactly zero.
- A `Mask` maps `model.named_parameters()` names (a tied head counts once) to bool tensors of the parameter's
  shape; `mask_count` is the number of True entries. `match_parameter_count` returns a mask with exactly the
  requested count (seeded random trimming / padding).
- `masked_finetune` changes only masked entries: every unmasked entry is bit-identical afterwards (frozen values are
  copied back after each optimiser step).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedsparse.lm.facts import (
    ATTRIBUTE_END,
    PROMPT_FORMATS,
    Fact,
    FactSplits,
    RelearnSplit,
    fact_accuracy,
    render_prompt,
    subject_span,
)
from fedsparse.lm.model import GPT, next_token_loss
from fedsparse.lm.tokenizer import CharTokenizer
from fedsparse.lm.train import evaluate, sample_batch

Mask = dict[str, torch.Tensor]
ComponentKind = Literal["attn", "mlp"]
_NAME_LETTERS = "bdfgklmnprstvzaeiou"


@dataclass(frozen=True, order=True)
class Component:
    """One layer's attention block or MLP."""

    kind: ComponentKind
    layer: int

    @property
    def prefix(self) -> str:
        """Prefix of this component's parameter names."""
        return f"blocks.{self.layer}.{self.kind}."

    def __str__(self) -> str:
        return f"{self.kind}{self.layer}"


@dataclass(frozen=True)
class PatchingBatch:
    """Clean prompts and their subject-corrupted twins, all of one length and format, with the target ids."""

    clean: torch.Tensor  # (batch, time)
    corrupt: torch.Tensor  # (batch, time)
    target: torch.Tensor  # (batch,) first character of the true attribute
    subject_positions: tuple[int, ...]


@dataclass(frozen=True)
class Localization:
    """A parameter mask and how it was chosen.

    `components` are the candidates in rank order (the mask holds the leading ones, the last of them possibly in
    part, plus any padding); `scores` are their scores when the method scores them.
    """

    name: str
    mask: Mask
    components: tuple[Component, ...]
    scores: dict[Component, float] = field(default_factory=dict)

    @property
    def parameter_count(self) -> int:
        """Number of masked (trainable) entries."""
        return mask_count(self.mask)


# ----------------------------------------------------------------------------------------------- components, masks


def all_components(model: GPT) -> list[Component]:
    """Attention and MLP of every layer, layer by layer."""
    return [Component(kind, layer) for layer in range(model.config.n_layer) for kind in ("attn", "mlp")]


def component_module(model: GPT, component: Component) -> nn.Module:
    """The module whose output is the component's contribution to the residual stream."""
    block = model.blocks[component.layer]
    return block.attn if component.kind == "attn" else block.mlp


def empty_mask(model: GPT) -> Mask:
    """All-False mask over the model's named parameters."""
    return {name: torch.zeros_like(param, dtype=torch.bool) for name, param in model.named_parameters()}


def mask_count(mask: Mask) -> int:
    """Number of True entries."""
    return int(sum(int(values.sum()) for values in mask.values()))


def components_mask(model: GPT, components: Sequence[Component]) -> Mask:
    """Mask of every parameter of the given components."""
    mask = empty_mask(model)
    prefixes = tuple(component.prefix for component in components)
    for name in mask:
        if name.startswith(prefixes):
            mask[name].fill_(True)
    return mask


def _flatten(mask: Mask) -> torch.Tensor:
    return torch.cat([values.reshape(-1) for values in mask.values()])


def _unflatten(flat: torch.Tensor, like: Mask) -> Mask:
    out: Mask = {}
    offset = 0
    for name, values in like.items():
        out[name] = flat[offset:offset + values.numel()].view_as(values).clone()
        offset += values.numel()
    return out


def match_parameter_count(mask: Mask, count: int, seed: int = 0, pool: Mask | None = None) -> Mask:
    """A copy of `mask` with exactly `count` True entries.

    Too many: a seeded random subset of the True entries is switched off. Too few: seeded random False entries of
    `pool` (default: every parameter) are switched on. Raises ValueError if `pool` cannot supply enough entries.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    flat = _flatten(mask).clone()
    current = int(flat.sum())
    generator = torch.Generator().manual_seed(seed)
    if current > count:
        on = flat.nonzero().squeeze(1)
        drop = on[torch.randperm(on.numel(), generator=generator)[:current - count]]
        flat[drop] = False
    elif current < count:
        eligible = _flatten(pool) & ~flat if pool is not None else ~flat
        candidates = eligible.nonzero().squeeze(1)
        if candidates.numel() < count - current:
            raise ValueError(f"cannot pad the mask from {current} to {count}: only {candidates.numel()} entries free")
        add = candidates[torch.randperm(candidates.numel(), generator=generator)[:count - current]]
        flat[add] = True
    return _unflatten(flat, mask)


def ranked_mask(model: GPT, ranked: Sequence[Component], count: int, seed: int = 0) -> Mask:
    """Whole components in rank order until `count` entries are reached; the last one partially (random subset)."""
    chosen: list[Component] = []
    for component in ranked:
        chosen.append(component)
        if mask_count(components_mask(model, chosen)) >= count:
            break
    mask = components_mask(model, chosen)
    if mask_count(mask) < count:
        raise ValueError(f"the ranked components hold {mask_count(mask)} parameters, fewer than {count}")
    return match_parameter_count(mask, count, seed=seed)


# ------------------------------------------------------------------------------------------------------- patching


@contextmanager
def capture_outputs(model: GPT, components: Sequence[Component]) -> Iterator[dict[Component, torch.Tensor]]:
    """Within the context, every forward pass stores each component's output in the yielded dict."""
    store: dict[Component, torch.Tensor] = {}
    handles = []
    for component in components:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor, key: Component = component) -> None:
            store[key] = output
        handles.append(component_module(model, component).register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def patched(
    model: GPT, component: Component, positions: Sequence[int], values: torch.Tensor,
) -> Iterator[None]:
    """Within the context, the component's output at `positions` is replaced by `values[:, positions]`."""
    index = torch.tensor(list(positions), dtype=torch.long)

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, index] = values[:, index].to(output.dtype)
        return output

    handle = component_module(model, component).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def target_logprob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p(target) at the last position: logits (batch, time, vocab), target (batch,) -> (batch,)."""
    return F.log_softmax(logits[:, -1, :], dim=-1).gather(1, target[:, None]).squeeze(1)


def corrupt_subject(prompt: str, span: range, rng: random.Random) -> str:
    """`prompt` with every character in `span` replaced by a different random letter (same length)."""
    chars = list(prompt)
    for position in span:
        chars[position] = rng.choice([letter for letter in _NAME_LETTERS if letter != chars[position].lower()])
    return "".join(chars)


def make_patching_batches(
    facts: Sequence[Fact], tokenizer: CharTokenizer, format_index: int = 0, seed: int = 0,
) -> list[PatchingBatch]:
    """Clean / corrupted prompt pairs of `format_index`, grouped into batches of equal length."""
    rng = random.Random(seed)
    groups: dict[int, list[tuple[list[int], list[int], int, range]]] = {}
    for fact in facts:
        prompt = render_prompt(fact.subject, format_index)
        span = subject_span(fact, format_index)
        corrupted = corrupt_subject(prompt, span, rng)
        target = tokenizer.encode(fact.attribute[0])[0]
        groups.setdefault(len(prompt), []).append((tokenizer.encode(prompt), tokenizer.encode(corrupted), target, span))
    batches = []
    for length in sorted(groups):
        rows = groups[length]
        batches.append(PatchingBatch(
            clean=torch.tensor([row[0] for row in rows]),
            corrupt=torch.tensor([row[1] for row in rows]),
            target=torch.tensor([row[2] for row in rows]),
            subject_positions=tuple(rows[0][3]),
        ))
    return batches


@torch.no_grad()
def patch_effect(
    model: GPT, batch: PatchingBatch, component: Component, positions: Sequence[int],
) -> torch.Tensor:
    """Per fact: metric(corrupt run with the component's clean output restored at `positions`) - metric(corrupt)."""
    model.eval()
    with capture_outputs(model, [component]) as clean_outputs:
        model(batch.clean)
    corrupt_metric = target_logprob(model(batch.corrupt), batch.target)
    with patched(model, component, positions, clean_outputs[component]):
        patched_metric = target_logprob(model(batch.corrupt), batch.target)
    return patched_metric - corrupt_metric


@torch.no_grad()
def clean_corrupt_gap(model: GPT, batches: Sequence[PatchingBatch]) -> float:
    """Sum over facts of metric(clean) - metric(corrupt): the total a restoration could recover."""
    model.eval()
    return float(sum(
        (target_logprob(model(b.clean), b.target) - target_logprob(model(b.corrupt), b.target)).sum() for b in batches
    ))


def _recovered(model: GPT, batches: Sequence[PatchingBatch], component: Component, where: str, gap: float) -> float:
    total = 0.0
    for batch in batches:
        positions = batch.subject_positions if where == "subject" else (batch.clean.shape[1] - 1,)
        total += float(patch_effect(model, batch, component, positions).sum())
    return total / gap if gap else 0.0


def lookup_mlp_scores(model: GPT, batches: Sequence[PatchingBatch]) -> dict[Component, float]:
    """Per MLP: fraction of the clean-corrupt gap recovered by restoring its output at the subject positions."""
    gap = clean_corrupt_gap(model, batches)
    return {
        component: _recovered(model, batches, component, "subject", gap)
        for component in all_components(model) if component.kind == "mlp"
    }


def causal_tracing_scores(model: GPT, batches: Sequence[PatchingBatch]) -> dict[Component, float]:
    """Per component: fraction of the gap recovered by restoring its output at the last prompt position."""
    gap = clean_corrupt_gap(model, batches)
    return {component: _recovered(model, batches, component, "last", gap) for component in all_components(model)}


def attribution_patching_scores(model: GPT, batches: Sequence[PatchingBatch]) -> dict[Component, float]:
    """Per component: sum over facts and positions of d metric / d output (corrupt run) x (clean - corrupt output),
    divided by the clean-corrupt gap (a linear estimate of the recovery from restoring it everywhere)."""
    model.eval()
    components = all_components(model)
    gap = clean_corrupt_gap(model, batches)
    scores = dict.fromkeys(components, 0.0)
    for batch in batches:
        with torch.no_grad(), capture_outputs(model, components) as clean_outputs:
            model(batch.clean)
        with capture_outputs(model, components) as corrupt_outputs:
            metric = target_logprob(model(batch.corrupt), batch.target).sum()
            gradients = torch.autograd.grad(metric, [corrupt_outputs[c] for c in components])
        for component, gradient in zip(components, gradients):
            difference = clean_outputs[component] - corrupt_outputs[component].detach()
            scores[component] += float((gradient * difference).sum())
    return {component: score / gap if gap else 0.0 for component, score in scores.items()}


def _rank(scores: dict[Component, float], by_magnitude: bool = False) -> list[Component]:
    """Components by decreasing score (or |score|); ties broken by (kind, layer)."""
    return sorted(scores, key=lambda c: (-(abs(scores[c]) if by_magnitude else scores[c]), c))


# -------------------------------------------------------------------------------------------------- localizations


def localize_lookup_mlps(
    model: GPT, batches: Sequence[PatchingBatch], layers: int, parameter_count: int | None = None, seed: int = 0,
) -> Localization:
    """The `layers` MLPs with the largest subject-position patching recovery (all their parameters, or trimmed /
    padded from the next-ranked MLPs to `parameter_count`)."""
    scores = lookup_mlp_scores(model, batches)
    ranked = _rank(scores)
    if not 1 <= layers <= len(ranked):
        raise ValueError(f"layers must be in [1, {len(ranked)}], got {layers}")
    count = mask_count(components_mask(model, ranked[:layers])) if parameter_count is None else parameter_count
    return Localization("lookup_mlps", ranked_mask(model, ranked, count, seed), tuple(ranked), scores)


def localize_causal_tracing(
    model: GPT, batches: Sequence[PatchingBatch], parameter_count: int, seed: int = 0,
) -> Localization:
    """Components ranked by last-position restoration, filled to `parameter_count`."""
    scores = causal_tracing_scores(model, batches)
    ranked = _rank(scores)
    return Localization("causal_tracing", ranked_mask(model, ranked, parameter_count, seed), tuple(ranked), scores)


def localize_attribution_patching(
    model: GPT, batches: Sequence[PatchingBatch], parameter_count: int, seed: int = 0,
) -> Localization:
    """Components ranked by |attribution patching score|, filled to `parameter_count`."""
    scores = attribution_patching_scores(model, batches)
    ranked = _rank(scores, by_magnitude=True)
    return Localization("attribution_patching", ranked_mask(model, ranked, parameter_count, seed), tuple(ranked),
                        scores)


def localize_random(model: GPT, parameter_count: int, seed: int = 0) -> Localization:
    """Components in a seeded random order, filled to `parameter_count`."""
    ranked = all_components(model)
    random.Random(seed).shuffle(ranked)
    return Localization("random", ranked_mask(model, ranked, parameter_count, seed), tuple(ranked))


def localize_all_mlps(model: GPT, parameter_count: int | None = None, seed: int = 0) -> Localization:
    """Every MLP parameter (optionally trimmed / padded to `parameter_count`)."""
    mlps = tuple(c for c in all_components(model) if c.kind == "mlp")
    mask = components_mask(model, mlps)
    if parameter_count is not None:
        mask = match_parameter_count(mask, parameter_count, seed)
    return Localization("all_mlps", mask, mlps)


def localize_all_weights(model: GPT, parameter_count: int | None = None, seed: int = 0) -> Localization:
    """Every parameter (optionally trimmed to `parameter_count`)."""
    mask = {name: torch.ones_like(param, dtype=torch.bool) for name, param in model.named_parameters()}
    if parameter_count is not None:
        mask = match_parameter_count(mask, parameter_count, seed)
    return Localization("all_weights", mask, tuple(all_components(model)))


def localize_all(
    model: GPT, batches: Sequence[PatchingBatch], lookup_layers: int, seed: int = 0,
) -> dict[str, Localization]:
    """Every localization; the scored and random ones matched to the lookup-MLP parameter count, while `all_mlps` and
    `all_weights` keep their natural sizes (the unlocalized baselines)."""
    lookup = localize_lookup_mlps(model, batches, lookup_layers, seed=seed)
    count = lookup.parameter_count
    found = [
        lookup,
        localize_causal_tracing(model, batches, count, seed),
        localize_attribution_patching(model, batches, count, seed),
        localize_random(model, count, seed),
        localize_all_mlps(model),
        localize_all_weights(model),
    ]
    return {localization.name: localization for localization in found}


# ------------------------------------------------------------------------------------------- unlearning and editing


def answer_logprobs(
    model: GPT, tokenizer: CharTokenizer, prompts: Sequence[str], answers: Sequence[str],
) -> torch.Tensor:
    """Per row, log p(answer | prompt) under teacher forcing (right-padded batch; differentiable)."""
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"need equally many (>0) prompts and answers, got {len(prompts)} and {len(answers)}")
    rows = [(tokenizer.encode(p), tokenizer.encode(a)) for p, a in zip(prompts, answers)]
    width = max(len(p) + len(a) for p, a in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, (prompt_ids, answer_ids) in enumerate(rows):
        tokens[i, :len(prompt_ids) + len(answer_ids)] = torch.tensor(prompt_ids + answer_ids)
        scored[i, len(prompt_ids) - 1:len(prompt_ids) + len(answer_ids) - 1] = True
    losses = next_token_loss(model, tokens, reduction="none")
    return -(losses * scored).sum(dim=1)


def _log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_p)) for log_p < 0, computed stably."""
    log_p = log_p.clamp(max=-1e-6)
    return torch.where(log_p > -math.log(2), torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


@dataclass(frozen=True)
class EditConfig:
    """Masked unlearning / editing: Adam, forget loss + maintain CE + corpus LM loss, on prompts of one format.

    Unlearning minimises -log(1 - p(attribute.)); editing minimises -log p(new attribute.) instead.
    """

    steps: int = 60
    lr: float = 1e-3
    maintain_weight: float = 1.0
    lm_weight: float = 1.0
    lm_batch: int = 8
    train_format: int = 0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.lm_batch < 1 or not 0 <= self.train_format < len(PROMPT_FORMATS):
            raise ValueError(f"invalid EditConfig: {self}")


def masked_finetune(
    model: GPT, mask: Mask, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float, grad_clip: float = 1.0,
) -> list[float]:
    """Minimise `loss_fn(step)` for `steps` Adam steps, changing only the masked entries; returns the losses.

    Unmasked entries are restored from a frozen copy after every step, so they stay bit-identical. The model is left
    in eval mode with every parameter requiring grad again.
    """
    named = dict(model.named_parameters())
    if set(mask) != set(named):
        raise ValueError(f"mask names differ from the model's: {sorted(set(mask) ^ set(named))[:5]}")
    trainable = {name: param for name, param in named.items() if bool(mask[name].any())}
    frozen = {name: param.detach().clone() for name, param in named.items()}
    for name, param in named.items():
        param.requires_grad_(name in trainable)
    optimizer = torch.optim.Adam(trainable.values(), lr=lr) if trainable else None
    losses: list[float] = []
    model.train()
    try:
        for step in range(steps):
            loss = loss_fn(step)
            losses.append(float(loss.detach()))
            if optimizer is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for name, param in trainable.items():
                param.grad.mul_(mask[name])
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable.values(), grad_clip)
            optimizer.step()
            with torch.no_grad():
                for name, param in trainable.items():
                    param.copy_(torch.where(mask[name], param, frozen[name]))
    finally:
        for param in named.values():
            param.requires_grad_(True)
        model.eval()
    return losses


def edit_targets(facts: Sequence[Fact], attributes: Sequence[str]) -> list[str]:
    """For editing: each fact's next attribute in `attributes` (cyclic), so every target differs from the truth."""
    order = list(attributes)
    return [order[(order.index(fact.attribute) + 1) % len(order)] for fact in facts]


def unlearn_facts(
    model: GPT, tokenizer: CharTokenizer, mask: Mask, splits: FactSplits, corpus_stream: torch.Tensor,
    config: EditConfig, targets: Sequence[str] | None = None,
) -> list[float]:
    """Unlearn `splits.forget` (or, with `targets`, edit them to those attributes) through `mask`, in place."""
    if targets is not None and len(targets) != len(splits.forget):
        raise ValueError(f"{len(targets)} targets for {len(splits.forget)} forget facts")
    generator = torch.Generator().manual_seed(config.seed)
    forget_prompts = [render_prompt(f.subject, config.train_format) for f in splits.forget]
    maintain_prompts = [render_prompt(f.subject, config.train_format) for f in splits.maintain]
    maintain_answers = [f.attribute + ATTRIBUTE_END for f in splits.maintain]

    def loss_fn(_step: int) -> torch.Tensor:
        if targets is None:
            answers = [f.attribute + ATTRIBUTE_END for f in splits.forget]
            forget = -_log1mexp(answer_logprobs(model, tokenizer, forget_prompts, answers)).mean()
        else:
            answers = [t + ATTRIBUTE_END for t in targets]
            forget = -answer_logprobs(model, tokenizer, forget_prompts, answers).mean()
        loss = forget
        if splits.maintain and config.maintain_weight:
            maintain = -answer_logprobs(model, tokenizer, maintain_prompts, maintain_answers).mean()
            loss = loss + config.maintain_weight * maintain
        if config.lm_weight:
            batch = sample_batch(corpus_stream, config.lm_batch, model.config.block_size, generator)
            loss = loss + config.lm_weight * next_token_loss(model, batch)
        return loss

    return masked_finetune(model, mask, loss_fn, config.steps, config.lr, config.grad_clip)


@dataclass(frozen=True)
class FactReport:
    """Accuracies per prompt format (index = format) and validation perplexity."""

    forget: tuple[float, ...]
    maintain: tuple[float, ...]
    edited: tuple[float, ...] | None
    val_perplexity: float

    def other_formats(self, train_format: int, which: str = "forget") -> float:
        """Mean accuracy of `which` ('forget', 'maintain', 'edited') over the formats not trained on."""
        values = getattr(self, which)
        others = [v for i, v in enumerate(values) if i != train_format]
        return sum(others) / len(others)


def evaluate_facts(
    model: GPT, tokenizer: CharTokenizer, splits: FactSplits, val_stream: torch.Tensor,
    targets: Sequence[str] | None = None, val_windows: int = 32,
) -> FactReport:
    """Forget / maintain (and edit-target) greedy accuracy in every format, and validation perplexity."""
    formats = range(len(PROMPT_FORMATS))
    return FactReport(
        forget=tuple(fact_accuracy(model, tokenizer, splits.forget, i) for i in formats),
        maintain=tuple(fact_accuracy(model, tokenizer, splits.maintain, i) for i in formats),
        edited=None if targets is None else tuple(
            fact_accuracy(model, tokenizer, splits.forget, i, targets) for i in formats),
        val_perplexity=evaluate(model, val_stream, val_windows).perplexity,
    )


@dataclass(frozen=True)
class RelearnResult:
    """Held-out forgotten facts' accuracy per format before and after relearning on the other half."""

    before: tuple[float, ...]
    after: tuple[float, ...]
    relearned: tuple[float, ...]  # accuracy on the relearned half itself, after


def relearn_attack(
    model: GPT, tokenizer: CharTokenizer, split: RelearnSplit, corpus_stream: torch.Tensor, steps: int = 30,
    lr: float = 1e-3, train_format: int = 0, seed: int = 0,
) -> RelearnResult:
    """Fine-tune a copy of `model` (all weights) on `split.relearn` with their true attributes (plus corpus LM loss)
    and measure how much of `split.heldout` comes back. `model` itself is not changed."""
    formats = range(len(PROMPT_FORMATS))
    before = tuple(fact_accuracy(model, tokenizer, split.heldout, i) for i in formats)
    attacked = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    prompts = [render_prompt(f.subject, train_format) for f in split.relearn]
    answers = [f.attribute + ATTRIBUTE_END for f in split.relearn]

    def loss_fn(_step: int) -> torch.Tensor:
        batch = sample_batch(corpus_stream, 8, attacked.config.block_size, generator)
        return -answer_logprobs(attacked, tokenizer, prompts, answers).mean() + next_token_loss(attacked, batch)

    everything = {name: torch.ones_like(p, dtype=torch.bool) for name, p in attacked.named_parameters()}
    masked_finetune(attacked, everything, loss_fn, steps, lr)
    return RelearnResult(
        before=before,
        after=tuple(fact_accuracy(attacked, tokenizer, split.heldout, i) for i in formats),
        relearned=tuple(fact_accuracy(attacked, tokenizer, split.relearn, i) for i in formats),
    )
