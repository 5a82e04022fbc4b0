"""Mechanistic localization for unlearning and editing synthetic facts in a small character LM (issue 12, section 3).

Steps: invent `--facts` subject -> sport facts and teach them, in all three prompt formats, to a small LM trained on
the facts mixed with tiny-shakespeare text; localize them with each method of `fedsparse.lm.mechanistic`
(lookup MLPs by subject-position activation patching; causal tracing and attribution patching; random components,
all matched to the lookup-MLP parameter count; all MLPs; all weights); then, from the same trained model and for each
localization, unlearn (and separately edit) `--forget` facts through the mask, training on prompt format 0 only, and
measure forget / maintain accuracy in every format, validation perplexity and a relearning attack (fine-tune all
weights on half of the forgotten facts, in format 0, and measure the other half).

The claim checked (Guo et al., arXiv:2410.12949): lookup-MLP localization is more robust across formats and to
relearning than output-tracing localizations (causal tracing, attribution patching).

Writes results.csv, scores.csv, training.json and mechanistic.png under --out and prints the table.

    python simulations/bench_lm_mechanistic.py [--out results/bench_lm_mechanistic] [--train-steps 2000]
    python simulations/bench_lm_mechanistic.py --reuse-model      # skip training, use the saved model

Measured on this project's shared 2 cores (`--threads 1`), seeds 0, 1, 2: 4 layers, 64 dims, 208,320 parameters,
2000 steps in 128-302 s; the 60 facts known at 93-100% in every format; whole run 200-464 s. The lookup MLP is mlp0
on every seed (75-81% of the gap recovered at the subject positions); output tracing ranks mlp3 / attn2 first.
Unlearning (mean of 3 seeds; forget accuracy in the untrained formats / held-out half after relearning):
lookup_mlps 0.09 / 0.22, causal_tracing 0.22 / 0.39, attribution_patching 0.14 / 0.26, random 0.16 / 0.40,
all_mlps 0.06 / 0.28, all_weights 0.05 / 0.18 (all_weights alone costs maintain accuracy and perplexity). Lookup MLPs
did at least as well as causal tracing on every seed; attribution patching, whose mask takes in part of mlp0 on
seeds 1-2, is close. Three seeds and 8 held-out facts per seed make these differences indicative, not significant.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from pathlib import Path

import torch

from fedsparse.lm.corpus import load_shakespeare, train_val_split
from fedsparse.lm.facts import (
    PROMPT_FORMATS,
    SPORTS,
    FactSplits,
    fact_accuracy,
    facts_text,
    make_facts,
    relearn_split,
    split_facts,
)
from fedsparse.lm.mechanistic import (
    EditConfig,
    FactReport,
    Localization,
    RelearnResult,
    edit_targets,
    evaluate_facts,
    localize_all,
    make_patching_batches,
    relearn_attack,
    unlearn_facts,
)
from fedsparse.lm.model import GPT, GPTConfig
from fedsparse.lm.tokenizer import CharTokenizer
from fedsparse.lm.train import TrainConfig, evaluate, train_lm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: one seed, a few minutes on one core)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_lm_mechanistic"))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--facts", type=int, default=60)
    parser.add_argument("--forget", type=int, default=16)
    parser.add_argument("--corpus-chars", type=int, default=200_000)
    parser.add_argument("--fact-repeats", type=int, default=40)
    parser.add_argument("--corpus-chunk", type=int, default=80)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lookup-layers", type=int, default=2)
    parser.add_argument("--edit-steps", type=int, default=60)
    parser.add_argument("--edit-lr", type=float, default=1e-3)
    parser.add_argument("--relearn-steps", type=int, default=30)
    parser.add_argument("--relearn-lr", type=float, default=3e-4)
    parser.add_argument("--reuse-model", action="store_true")
    return parser.parse_args(argv)


def mean(values: tuple[float, ...] | list[float]) -> float:
    """Arithmetic mean."""
    return sum(values) / len(values)


def row_for(
    mode: str, name: str, count: int, report: FactReport, val_ppl_before: float, relearn: RelearnResult | None,
) -> dict[str, object]:
    """One CSV row: accuracies per format, other-format means, perplexity and relearning recovery."""
    row: dict[str, object] = {"mode": mode, "localization": name, "parameters": count}
    for index in range(len(PROMPT_FORMATS)):
        row[f"forget_f{index}"] = report.forget[index]
    row["forget_other_formats"] = report.other_formats(0, "forget")
    if report.edited is not None:
        for index in range(len(PROMPT_FORMATS)):
            row[f"edited_f{index}"] = report.edited[index]
        row["edited_other_formats"] = report.other_formats(0, "edited")
    row["maintain_f0"] = report.maintain[0]
    row["maintain_other_formats"] = report.other_formats(0, "maintain")
    row["val_ppl_before"] = val_ppl_before
    row["val_ppl_after"] = report.val_perplexity
    if relearn is not None:
        row["heldout_before_mean"] = mean(relearn.before)
        row["heldout_after_f0"] = relearn.after[0]
        row["heldout_after_mean"] = mean(relearn.after)
        row["relearned_half_after_f0"] = relearn.relearned[0]
    return row


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """Grouped bars per localization: forget accuracy (format 0 / other formats), maintain, relearned recovery."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [mode for mode in ("unlearn", "edit") if any(r["mode"] == mode for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.2), squeeze=False)
    metrics = [("forget_f0", "forget acc, format 0 (trained)"), ("forget_other_formats", "forget acc, other formats"),
               ("maintain_other_formats", "maintain acc, other formats"),
               ("heldout_after_mean", "held-out forget acc after relearning")]
    colors = {"forget_f0": "tab:blue", "forget_other_formats": "tab:orange", "edited_other_formats": "tab:purple",
              "maintain_other_formats": "tab:green", "heldout_after_mean": "tab:red"}
    for axis, mode in zip(axes[0], modes):
        subset = [r for r in rows if r["mode"] == mode]
        shown = metrics if mode != "edit" else (
            metrics[:2] + [("edited_other_formats", "new attribute acc, other formats")] + metrics[2:])
        width = 0.8 / len(shown)
        for offset, (key, label) in enumerate(shown):
            xs = [i + offset * width for i in range(len(subset))]
            axis.bar(xs, [float(r.get(key, 0.0)) for r in subset], width, label=label, color=colors[key])
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(subset))])
        axis.set_xticklabels([str(r["localization"]) for r in subset], rotation=30, ha="right", fontsize=8)
        axis.set_ylim(0, 1.4)
        axis.set_title(f"{mode} (trained on format 0): forget / relearn lower = better, maintain higher = better",
                       fontsize=9)
        axis.legend(fontsize=7, ncol=2, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict[str, object]]) -> None:
    """Markdown table of the headline columns."""
    header = ("mode", "localization", "params", "forget f0", "forget other", "edited other", "maintain f0",
              "maintain other", "val ppl", "relearn held-out (before->after)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        edited = f"{r['edited_other_formats']:.2f}" if "edited_other_formats" in r else "-"
        relearn = (f"{r['heldout_before_mean']:.2f} -> {r['heldout_after_mean']:.2f}"
                   if "heldout_after_mean" in r else "-")
        print(f"| {r['mode']} | {r['localization']} | {r['parameters']} | {r['forget_f0']:.2f} | "
              f"{r['forget_other_formats']:.2f} | {edited} | {r['maintain_f0']:.2f} | "
              f"{r['maintain_other_formats']:.2f} | {r['val_ppl_after']:.2f} | {relearn} |")


def main(argv: list[str] | None = None) -> None:
    """Train (or load), localize, unlearn / edit through each mask, attack, write and print the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    split = train_val_split(load_shakespeare(args.data_root))
    corpus = split.train[:args.corpus_chars]
    facts = make_facts(args.facts, SPORTS, seed=args.seed)
    splits: FactSplits = split_facts(facts, args.forget, seed=args.seed)
    text = facts_text(facts, corpus, args.fact_repeats, seed=args.seed, corpus_chunk=args.corpus_chunk)
    tokenizer = CharTokenizer.from_texts(split.train, split.val, text)
    corpus_stream = tokenizer.encode_tensor(corpus)
    val_stream = tokenizer.encode_tensor(split.val)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=4, n_embd=args.n_embd)
    model = GPT(config)
    model_path = args.out / "model.pt"
    if args.reuse_model and model_path.exists():
        model.load_state_dict(torch.load(model_path))
        training = json.loads((args.out / "training.json").read_text())
    else:
        result = train_lm(model, tokenizer.encode_tensor(text),
                          TrainConfig(steps=args.train_steps, lr=args.lr, seed=args.seed, eval_every=500),
                          val_stream=val_stream, log=True)
        torch.save(model.state_dict(), model_path)
        training = {"seconds": result.seconds, "steps": result.steps, "parameters": model.num_parameters(),
                    "text_chars": len(text), "curve": result.curve}
    model.eval()
    training["fact_accuracy"] = [fact_accuracy(model, tokenizer, facts, i) for i in range(len(PROMPT_FORMATS))]
    (args.out / "training.json").write_text(json.dumps(training, indent=1))
    val_ppl = evaluate(model, val_stream, 64).perplexity
    print(f"trained: {training['parameters']} parameters, {training['seconds']:.0f}s; fact accuracy per format "
          f"{[round(a, 2) for a in training['fact_accuracy']]}; val ppl {val_ppl:.2f}", flush=True)

    batches = make_patching_batches(splits.forget, tokenizer, format_index=0, seed=args.seed)
    localizations: dict[str, Localization] = localize_all(model, batches, args.lookup_layers, seed=args.seed)
    with open(args.out / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["localization", "rank", "component", "score"])
        for name, localization in localizations.items():
            for rank, component in enumerate(localization.components):
                writer.writerow([name, rank, str(component), localization.scores.get(component, "")])
    for name, localization in localizations.items():
        ranked = ", ".join(f"{c}={localization.scores[c]:.2f}" if c in localization.scores else str(c)
                           for c in localization.components)
        print(f"{name:22s} {localization.parameter_count:7d} params  {ranked}", flush=True)

    halves = relearn_split(splits.forget, seed=args.seed)
    rows: list[dict[str, object]] = []
    before = evaluate_facts(model, tokenizer, splits, val_stream, val_windows=64)
    rows.append(row_for("none", "trained model", 0, before, val_ppl,
                        relearn_attack(model, tokenizer, halves, corpus_stream, args.relearn_steps, args.relearn_lr,
                                       seed=args.seed)))
    edit_config = EditConfig(steps=args.edit_steps, lr=args.edit_lr, seed=args.seed)
    for mode in ("unlearn", "edit"):
        targets = edit_targets(splits.forget, SPORTS) if mode == "edit" else None
        for name, localization in localizations.items():
            edited = copy.deepcopy(model)
            unlearn_facts(edited, tokenizer, localization.mask, splits, corpus_stream, edit_config, targets=targets)
            report = evaluate_facts(edited, tokenizer, splits, val_stream, targets=targets, val_windows=64)
            attack = relearn_attack(edited, tokenizer, halves, corpus_stream, args.relearn_steps, args.relearn_lr,
                                    seed=args.seed)
            rows.append(row_for(mode, name, localization.parameter_count, report, val_ppl, attack))
            print(f"{mode} {name}: done ({time.perf_counter() - started:.0f}s)", flush=True)

    keys: list[str] = []
    for row in rows:
        keys += [key for key in row if key not in keys]
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    plot([r for r in rows if r["mode"] != "none"], args.out / "mechanistic.png")
    print_table(rows)
    print(f"total {time.perf_counter() - started:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
