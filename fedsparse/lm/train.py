"""Training and evaluation of the character LM on a token stream.

Invariants:
- Training batches are random windows of `block_size + 1` tokens drawn with a seeded `torch.Generator`, so a run is
  reproducible for a given seed and thread count.
- `evaluate` is deterministic: it scores the first `max_windows` non-overlapping windows of the stream (every
  next-token prediction inside a window, from a context of at most `block_size` tokens) in eval mode.
- Perplexity is `exp(mean next-token cross-entropy)`, in nats per character; accuracy is the share of scored
  positions whose most likely next character is the true one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedsparse.lm.model import GPT, next_token_loss


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: AdamW, linear warm-up then cosine decay to `min_lr_ratio * lr`."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_windows: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.eval_windows < 1:
            raise ValueError(f"invalid TrainConfig: {self}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


@dataclass(frozen=True)
class EvalResult:
    """Mean next-token loss (nats/char) over the scored tokens, its exponential, and how many of the tokens the
    model's most likely next token got right."""

    loss: float
    tokens: int
    correct: int = 0

    @property
    def accuracy(self) -> float:
        """Share of the scored tokens whose argmax prediction is the true next token."""
        return self.correct / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        """exp(loss)."""
        return math.exp(self.loss)


@dataclass
class TrainResult:
    """What a training run reached: final validation loss, the curve and the time it took."""

    steps: int
    seconds: float
    final_train_loss: float
    final_val: EvalResult | None
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "train_loss", "val_loss"}


def sample_batch(stream: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of `block_size + 1` consecutive tokens from a 1-D stream."""
    if stream.numel() < block_size + 1:
        raise ValueError(f"stream of {stream.numel()} tokens is shorter than one window ({block_size + 1})")
    starts = torch.randint(0, stream.numel() - block_size, (batch_size,), generator=generator)
    return torch.stack([stream[s:s + block_size + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: GPT, stream: torch.Tensor, max_windows: int = 64, batch_size: int = 32) -> EvalResult:
    """Mean next-token loss over the first `max_windows` non-overlapping windows of `stream`."""
    window = model.config.block_size + 1
    count = min(max_windows, (stream.numel() - 1) // model.config.block_size)
    if count < 1:
        raise ValueError(f"stream of {stream.numel()} tokens is too short to evaluate")
    starts = [i * model.config.block_size for i in range(count)]
    was_training = model.training
    model.eval()
    total, tokens, correct = 0.0, 0, 0
    for first in range(0, count, batch_size):
        batch = torch.stack([stream[s:s + window] for s in starts[first:first + batch_size]])
        logits = model(batch[:, :-1])
        losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # = next_token_loss's
        total += losses.sum().item()
        tokens += losses.numel()
        correct += int((logits.argmax(dim=-1) == batch[:, 1:]).sum())
    model.train(was_training)
    return EvalResult(loss=total / tokens, tokens=tokens, correct=correct)


def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, LayerNorm gains or position embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "pos_emb.weight"]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n == "pos_emb.weight"]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))


def train_lm(
    model: GPT,
    train_stream: torch.Tensor,
    config: TrainConfig,
    val_stream: torch.Tensor | None = None,
    log: bool = False,
) -> TrainResult:
    """Train `model` in place on random windows of `train_stream`; evaluate on `val_stream` every `eval_every`."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    model.train()
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    recent: list[float] = []
    val: EvalResult | None = None
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        batch = sample_batch(train_stream, config.batch_size, model.config.block_size, generator)
        loss = next_token_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        recent = (recent + [loss.item()])[-50:]
        last = step + 1 == config.steps
        if val_stream is not None and ((step + 1) % config.eval_every == 0 or last):
            val = evaluate(model, val_stream, config.eval_windows)
            point = {"step": step + 1, "train_loss": sum(recent) / len(recent), "val_loss": val.loss}
            curve.append(point)
            if log:
                print(f"step {step + 1:5d}  train {point['train_loss']:.3f}  val {val.loss:.3f}  "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
    return TrainResult(
        steps=config.steps,
        seconds=time.perf_counter() - start,
        final_train_loss=sum(recent) / len(recent) if recent else float("nan"),
        final_val=val,
        curve=curve,
    )
