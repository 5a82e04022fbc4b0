"""Centralised gradient-ascent unlearning of in- vs out-of-distribution forget sets in a small character LM.

Steps: split tiny-shakespeare into train/validation text and keep the first `--train-chars` of the training text
(a smaller corpus is seen for more epochs, so natural passages get memorized too); draw 2n passages opening
speaker turns of it: n are the in-distribution (ID) forget set, the other n its twins, cut out of every model's
training text; draw 2n canaries: n, inserted `--canary-repeats` times into the training text, are the
out-of-distribution (OOD) forget set, the other n (never inserted) its twins; train the target model on that text
and a reference model on it without the ID forget passages and without canaries (same initialisation, seed and
steps); measure per-example memorization (reference loss / target
loss), difficulty (reference loss) and exact extraction; then run gradient ascent on each forget set from the target
model and trace, every few steps, the forget quality (loss-threshold distinguishability from the twins, see
`fedsparse.lm.memorization.forget_quality`), the forget/twin losses, the extraction rate and validation perplexity.

Writes under --out: trace.csv, examples.csv, training.csv, summary.json, vocab.json and unlearning.png, and prints
the tables.

    python simulations/bench_lm_unlearning.py [--out results/bench_lm] [--train-steps 1000] [--seed 0]
    python simulations/bench_lm_unlearning.py --reuse-models --unlearn-lr 3e-4   # unlearning only, saved models
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fedsparse.lm.corpus import load_shakespeare, train_val_split
from fedsparse.lm.memorization import (
    ForgetSet,
    TracePoint,
    UnlearnConfig,
    corpus_passages,
    forget_quality,
    gradient_ascent_trace,
    insert_sequences,
    make_canaries,
    measure_examples,
    remove_sequences,
    sequence_losses,
)
from fedsparse.lm.model import GPT, GPTConfig
from fedsparse.lm.tokenizer import CharTokenizer
from fedsparse.lm.train import TrainConfig, TrainResult, evaluate, train_lm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options. The defaults aim at ~5 minutes on an idle core; 1118 s were measured on this project's
    2 cores shared with ~8 other jobs (418 s with --reuse-models)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_lm"))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=3)
    parser.add_argument("--n-embd", type=int, default=96)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--train-chars", type=int, default=300_000, help="training text kept (0: all of it)")
    parser.add_argument("--reuse-models", action="store_true", help="load target.pt/reference.pt from --out")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--forget-size", type=int, default=32, help="examples per forget set (and as many twins)")
    parser.add_argument("--example-len", type=int, default=64, help="characters per forget example (<= block + 1)")
    parser.add_argument("--prefix-len", type=int, default=16, help="prompt characters for exact extraction")
    parser.add_argument("--canary-kind", default="random", choices=("random", "digits", "code"))
    parser.add_argument("--canary-repeats", type=int, default=10)
    parser.add_argument("--unlearn-steps", type=int, default=120)
    parser.add_argument("--unlearn-lr", type=float, default=3e-5)
    parser.add_argument("--eval-every", type=int, default=6)
    parser.add_argument("--val-windows", type=int, default=48)
    return parser.parse_args(argv)


def train_model(name: str, text: str, val_stream: torch.Tensor, tokenizer: CharTokenizer,
                model_config: GPTConfig, train_config: TrainConfig) -> tuple[GPT, TrainResult]:
    """A model trained from the seeded initialisation on `text`."""
    torch.manual_seed(train_config.seed)
    model = GPT(model_config)
    print(f"training {name}: {model.num_parameters():,} parameters, {len(text):,} characters", flush=True)
    result = train_lm(model, tokenizer.encode_tensor(text), train_config, val_stream, log=True)
    return model, result


def trained_models(args: argparse.Namespace, target_text: str, reference_text: str, val_stream: torch.Tensor,
                   tokenizer: CharTokenizer, model_config: GPTConfig) -> tuple[GPT, GPT, dict[str, TrainResult]]:
    """Train target and reference (saved to --out), or load them with --reuse-models."""
    paths = {"target": args.out / "target.pt", "reference": args.out / "reference.pt"}
    if args.reuse_models:
        models = []
        for path in paths.values():
            model = GPT(model_config)
            model.load_state_dict(torch.load(path, weights_only=True))
            models.append(model)
        return models[0], models[1], {}
    train_config = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
                               eval_every=max(1, args.train_steps // 5), eval_windows=args.val_windows,
                               seed=args.seed)
    target, target_run = train_model("target", target_text, val_stream, tokenizer, model_config, train_config)
    reference, reference_run = train_model("reference", reference_text, val_stream, tokenizer, model_config,
                                           train_config)
    torch.save(target.state_dict(), paths["target"])
    torch.save(reference.state_dict(), paths["reference"])
    return target, reference, {"target": target_run, "reference": reference_run}


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts as CSV, the header from the first row."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def first_step(trace: list[TracePoint], quality: float) -> TracePoint | None:
    """The first trace point reaching `quality` after step 0, or None."""
    return next((p for p in trace if p.step > 0 and p.quality >= quality), None)


def plot(traces: dict[str, list[TracePoint]], path: Path) -> None:
    """Quality, forget-minus-twin loss and validation perplexity against ascent steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, trace in traces.items():
        steps = [p.step for p in trace]
        axes[0].plot(steps, [p.quality for p in trace], marker="o", label=name)
        axes[1].plot(steps, [p.forget_loss - p.holdout_loss for p in trace], marker="o", label=name)
        axes[2].plot(steps, [p.val_perplexity for p in trace], marker="o", label=name)
    axes[0].set(title="forget quality H(eps) (1 = like never-trained twins)", xlabel="gradient-ascent step")
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].set(title="forget loss - twin loss (nats/char)", xlabel="gradient-ascent step")
    axes[2].set(title="validation perplexity", xlabel="gradient-ascent step", yscale="log")
    for axis in axes:
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write its files."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.example_len > args.block_size + 1:
        raise ValueError("--example-len must be <= --block-size + 1")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    split = train_val_split(load_shakespeare(args.data_root))
    train_text = split.train
    if 0 < args.train_chars < len(train_text):
        cut = train_text.find("\n\n", args.train_chars)
        train_text = train_text[:cut + 2] if cut >= 0 else train_text
    passages = corpus_passages(train_text, 2 * args.forget_size, args.example_len, seed=args.seed)
    id_examples, id_twins = passages[:args.forget_size], passages[args.forget_size:]
    canaries = make_canaries(args.canary_kind, 2 * args.forget_size, args.example_len, seed=args.seed)
    forget_sets = [
        ForgetSet("ID passages", True, id_examples, id_twins),
        ForgetSet(f"OOD {args.canary_kind} canaries", False, canaries[:args.forget_size],
                  canaries[args.forget_size:]),
    ]
    common_text = remove_sequences(train_text, id_twins)  # no model trains on a twin
    target_text = insert_sequences(common_text, forget_sets[1].examples, args.canary_repeats, seed=args.seed)
    reference_text = remove_sequences(common_text, id_examples)
    tokenizer = CharTokenizer.from_texts(split.train, split.val, *canaries)
    tokenizer.save(args.out / "vocab.json")
    val_stream = tokenizer.encode_tensor(split.val)

    model_config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                             n_head=args.n_head, n_embd=args.n_embd)
    target, reference, runs = trained_models(args, target_text, reference_text, val_stream, tokenizer, model_config)
    if runs:
        write_csv(args.out / "training.csv",
                  [{"model": name, **point} for name, run in runs.items() for point in run.curve])

    example_rows = []
    for forget in forget_sets:
        for role, texts in (("forget", forget.examples), ("twin", forget.holdout)):
            for measure in measure_examples(target, reference, tokenizer, texts, args.prefix_len):
                example_rows.append({"set": forget.name, "role": role, "text": measure.text,
                                     "target_loss": measure.target_loss, "reference_loss": measure.reference_loss,
                                     "memorization": measure.memorization, "difficulty": measure.difficulty,
                                     "extracted": int(measure.extracted)})
    write_csv(args.out / "examples.csv", example_rows)

    unlearn_config = UnlearnConfig(steps=args.unlearn_steps, lr=args.unlearn_lr, eval_every=args.eval_every,
                                   val_windows=args.val_windows)
    traces = {}
    for forget in forget_sets:
        print(f"gradient ascent on {forget.name}", flush=True)
        traces[forget.name] = gradient_ascent_trace(target, tokenizer, forget, val_stream, unlearn_config,
                                                    args.prefix_len)
    write_csv(args.out / "trace.csv", [{"set": name, **asdict(point), "val_perplexity": point.val_perplexity}
                                       for name, trace in traces.items() for point in trace])
    plot(traces, args.out / "unlearning.png")

    summary_baseline: dict[str, dict] = {}
    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": target.num_parameters(),
        "train_chars": {"target": len(target_text), "reference": len(reference_text)},
        "train_seconds": {name: run.seconds for name, run in runs.items()},
        "full_val_loss": {name: evaluate(model, val_stream, max_windows=10**9).loss
                          for name, model in (("target", target), ("reference", reference))},
        "sets": {},
        "reference_model_quality": summary_baseline,
    }
    print("\n| model | train steps | seconds | val loss, all of val (nats/char) | val perplexity |")
    print("|---|---:|---:|---:|---:|")
    for name, loss in summary["full_val_loss"].items():
        steps, seconds = (str(runs[name].steps), f"{runs[name].seconds:.0f}") if runs else ("(loaded)", "-")
        print(f"| {name} | {steps} | {seconds} | {loss:.3f} | {np.exp(loss):.2f} |")
    print("\n| set | role | mean target loss | mean reference loss (difficulty) | memorization (median) | extracted |")
    print("|---|---|---:|---:|---:|---:|")
    for forget in forget_sets:
        for role in ("forget", "twin"):
            rows = [r for r in example_rows if r["set"] == forget.name and r["role"] == role]
            print(f"| {forget.name} | {role} | {np.mean([r['target_loss'] for r in rows]):.3f} | "
                  f"{np.mean([r['reference_loss'] for r in rows]):.3f} | "
                  f"{np.median([r['memorization'] for r in rows]):.2f} | "
                  f"{sum(r['extracted'] for r in rows)}/{len(rows)} |")
    # The reference never trained on the forget set either: its score is what "fully unlearned" looks like here.
    print("\n| set | reference model: epsilon | quality | AUC |")
    print("|---|---:|---:|---:|")
    for forget in forget_sets:
        baseline = forget_quality(sequence_losses(reference, tokenizer, forget.examples),
                                  sequence_losses(reference, tokenizer, forget.holdout))
        summary_baseline[forget.name] = asdict(baseline)
        print(f"| {forget.name} | {baseline.epsilon:.2f} | {baseline.quality:.3f} | {baseline.auc:.3f} |")
    print("\n| set | step | forget loss | twin loss | epsilon | quality | AUC | extracted | val ppl |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, trace in traces.items():
        for point in trace:
            print(f"| {name} | {point.step} | {point.forget_loss:.3f} | {point.holdout_loss:.3f} | "
                  f"{point.epsilon:.2f} | {point.quality:.3f} | {point.auc:.3f} | {point.extraction_rate:.2f} | "
                  f"{point.val_perplexity:.2f} |")
        reached = first_step(trace, 0.5)
        crossed = next((p for p in trace if p.forget_loss >= p.holdout_loss), None)
        best = max(trace, key=lambda p: (p.quality, -p.val_loss))
        summary["sets"][name] = {
            "steps_to_quality_0.5": reached.step if reached else None,
            "val_ppl_at_quality_0.5": reached.val_perplexity if reached else None,
            "best_quality": best.quality, "best_quality_step": best.step, "val_ppl_at_best": best.val_perplexity,
            "val_ppl_before": trace[0].val_perplexity,
            "steps_to_cross_twins": crossed.step if crossed else None,
            "val_ppl_at_cross": crossed.val_perplexity if crossed else None,
        }
    print("\n| set | val ppl before | steps to quality >= 0.5 (val ppl) | steps until forget loss >= twin loss "
          "(val ppl) | best quality (step, val ppl) |")
    print("|---|---:|---|---|---|")
    for name, row in summary["sets"].items():
        reached = (f"{row['steps_to_quality_0.5']} ({row['val_ppl_at_quality_0.5']:.2f})"
                   if row["steps_to_quality_0.5"] is not None else "-")
        crossed = (f"{row['steps_to_cross_twins']} ({row['val_ppl_at_cross']:.2f})"
                   if row["steps_to_cross_twins"] is not None else "-")
        print(f"| {name} | {row['val_ppl_before']:.2f} | {reached} | {crossed} | "
              f"{row['best_quality']:.3f} ({row['best_quality_step']}, {row['val_ppl_at_best']:.2f}) |")
    summary["seconds"] = time.perf_counter() - started
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}/ in {summary['seconds']:.0f}s")


if __name__ == "__main__":
    main()
