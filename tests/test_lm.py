"""The character LM and its memorization/unlearning measures, on a tiny model (2 layers, 32 dims, block 32)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from fedsparse.lm.corpus import find_shakespeare, parse_turns, partition_by_speaker, train_val_split
from fedsparse.lm.memorization import (
    CANARY_ALPHABET,
    ForgetSet,
    UnlearnConfig,
    corpus_passages,
    exact_extraction,
    forget_quality,
    gradient_ascent_trace,
    insert_sequences,
    make_canaries,
    measure_examples,
    remove_sequences,
    sequence_losses,
)
from fedsparse.lm.model import GPT, GPTConfig, generate, next_token_loss
from fedsparse.lm.tokenizer import CharTokenizer, UnknownCharacterError
from fedsparse.lm.train import TrainConfig, evaluate, sample_batch, train_lm

WORDS = ["the", "king", "and", "queen", "of", "a", "fair", "land", "speak", "to", "my", "lord", "who", "doth", "not", "hear", "thee", "now"]
SPEAKERS = ["ROMEO", "JULIET", "First Citizen", "All", "KING RICHARD III"]


def synthetic_play(turns: int, seed: int) -> str:
    """A corpus in tiny-shakespeare's layout: 'SPEAKER:\\n' then lines, turns separated by blank lines."""
    rng = random.Random(seed)
    parts = []
    for _ in range(turns):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(rng.randint(1, 3))]
        parts.append(f"{rng.choice(SPEAKERS)}:\n" + "\n".join(lines) + "\n\n")
    return "".join(parts)


def _can_find_shakespeare() -> bool:
    try:
        find_shakespeare()
    except FileNotFoundError:
        return False
    return True


def tiny_model(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=32))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_forward_shapes_and_tied_head():
    model = tiny_model(vocab_size=20)
    logits = model(torch.randint(0, 20, (3, 17)))
    assert logits.shape == (3, 17, 20)
    assert model.head.weight is model.tok_emb.weight
    untied = GPT(GPTConfig(vocab_size=20, block_size=32, n_layer=2, n_head=4, n_embd=32, tie_weights=False))
    assert untied.num_parameters() == model.num_parameters() + 20 * 32
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=20, n_embd=30, n_head=4)


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model(vocab_size=20).eval()
    tokens = torch.randint(0, 20, (2, 24), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 15] = (changed[:, 15] + 7) % 20
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :15], after[:, :15], rtol=0, atol=1e-6)
    assert (before[:, 15:] - after[:, 15:]).abs().max() > 1e-3  # and the change is seen from position 15 on


def test_tokenizer_round_trip_save_load(tmp_path):
    text = "First Citizen:\nBefore we proceed, hear me speak.\n\n"
    tokenizer = CharTokenizer.from_texts(text, "0123")
    assert tokenizer.chars == "".join(sorted(set(text + "0123")))
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode_tensor("3210")) == "3210"
    tokenizer.save(tmp_path / "vocab.json")
    loaded = CharTokenizer.load(tmp_path / "vocab.json")
    assert loaded == tokenizer and loaded.encode(text) == tokenizer.encode(text)
    with pytest.raises(UnknownCharacterError) as error:
        tokenizer.encode("hear~")
    assert error.value.character == "~" and error.value.position == 4


def test_generate_greedy_is_deterministic_and_top1_sampling_equals_greedy():
    model = tiny_model(vocab_size=12)
    prompt = torch.tensor([[1, 2, 3]])
    greedy = generate(model, prompt, 40)  # longer than block_size: the context is cropped
    assert greedy.shape == (1, 43) and torch.equal(greedy[:, :3], prompt)
    assert torch.equal(greedy, generate(model, prompt, 40))
    top1 = generate(model, prompt, 40, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy)
    sampled = [generate(model, prompt, 20, temperature=2.0, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert not torch.equal(sampled[0], sampled[1])


def test_training_lowers_validation_loss():
    text = synthetic_play(200, seed=0)
    split = train_val_split(text, 0.2)
    tokenizer = CharTokenizer.from_texts(text)
    model = tiny_model(tokenizer.vocab_size)
    train_stream, val_stream = tokenizer.encode_tensor(split.train), tokenizer.encode_tensor(split.val)
    before = evaluate(model, val_stream, max_windows=16)
    assert before.loss == pytest.approx(math.log(tokenizer.vocab_size), abs=0.1)  # near uniform at init
    result = train_lm(model, train_stream, TrainConfig(steps=60, batch_size=16, warmup_steps=5, eval_every=60,
                                                       eval_windows=16), val_stream)
    assert result.final_val is not None and result.final_val.loss < before.loss - 0.8
    assert result.final_val.perplexity == pytest.approx(math.exp(result.final_val.loss))


def test_turns_tile_the_corpus_and_partition_splits_by_speaker():
    text = "Prologue line\n\n" + synthetic_play(60, seed=3)
    turns = parse_turns(text)
    assert turns[0].speaker == "" and turns[0].start == 0  # text before the first speaker line is kept
    assert all(a.end == b.start for a, b in itertools.pairwise(turns)) and turns[-1].end == len(text)
    assert {t.speaker for t in turns} == set(SPEAKERS) | {""}
    partition = partition_by_speaker(text, num_clients=3, seed=5)
    assert partition == partition_by_speaker(text, num_clients=3, seed=5)
    indices = sorted(i for client in partition.client_turns for i in client)
    assert indices == list(range(len(turns)))  # every turn, exactly once
    owners = {}
    for client, speakers in enumerate(partition.client_speakers):
        for speaker in speakers:
            assert speaker not in owners
            owners[speaker] = client
    for client, turn_indices in enumerate(partition.client_turns):
        assert all(owners[turns[i].speaker] == client for i in turn_indices)
    assert sum(len(partition.client_text(text, c)) for c in range(3)) == len(text)
    with pytest.raises(ValueError, match="speakers"):
        partition_by_speaker(text, num_clients=7)


@pytest.mark.skipif(not _can_find_shakespeare(), reason="tiny-shakespeare is absent")
def test_real_corpus_speakers():
    text = find_shakespeare().read_text(encoding="utf-8")
    turns = parse_turns(text)
    assert turns[0].speaker == "First Citizen" and len({t.speaker for t in turns}) > 200
    partition = partition_by_speaker(text, num_clients=10)
    sizes = [partition.client_chars(c) for c in range(10)]
    assert sum(sizes) == len(text) and max(sizes) - min(sizes) < 0.01 * len(text)


def train_with_canaries(canaries: list[str], seed: int, steps: int = 100) -> tuple[GPT, CharTokenizer]:
    """A tiny model trained `steps` times on every canary (one row each per batch) beside background text."""
    background = synthetic_play(300, seed=seed)
    tokenizer = CharTokenizer.from_texts(background, CANARY_ALPHABET)  # the same ids with or without canaries
    model = tiny_model(tokenizer.vocab_size, seed=seed)
    stream = tokenizer.encode_tensor(background)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    canary_rows = [tokenizer.encode_tensor(c) for c in canaries]
    for _ in range(steps):
        batch = sample_batch(stream, 6, model.config.block_size, generator)
        rows = [*batch, *canary_rows] if canary_rows else list(batch)
        loss = next_token_loss(model, torch.stack(rows))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, tokenizer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_trained_100_times_is_extracted_and_unseen_is_not(seed):
    canaries = make_canaries("random", 6, 33, seed=seed)
    trained, unseen = canaries[:3], canaries[3:]
    model, tokenizer = train_with_canaries(trained, seed)
    assert exact_extraction(model, tokenizer, trained, prefix_len=8).all()
    assert not exact_extraction(model, tokenizer, unseen, prefix_len=8).any()
    reference, _ = train_with_canaries([], seed)  # same background, seed and steps, no canary
    measures = measure_examples(model, reference, tokenizer, trained + unseen, prefix_len=8)
    assert all(m.memorization > 5 for m in measures[:3])
    assert all(0.5 < m.memorization < 2 for m in measures[3:])
    assert all(m.difficulty > 2.5 for m in measures)  # random characters are hard for a model never shown them


def test_forget_quality_hand_computed():
    separated = forget_quality(np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.1, 1.2]))
    assert separated.epsilon == math.inf and separated.quality == 0.0 and separated.auc == 1.0
    assert separated.epsilon_max == 1.0  # ceil(ln 2)
    over_unlearned = forget_quality(np.array([5.0, 6.0, 7.0]), np.array([1.0, 1.1, 1.2]))
    assert over_unlearned.quality == 0.0 and over_unlearned.auc == 0.0
    same = forget_quality(np.arange(8.0), np.arange(8.0) + 0.5)  # interleaved: f0 < h0 < f1 < h1 < ...
    # threshold at f_k (k+1 forget and k twins at or below): FPR = k/8, FNR = (7-k)/8. The largest bound is
    # log(1 - d - 6/8) - log(1/8) = ln(2 - 8d) at k = 6 (and the same at k = 1 from the other term); the thresholds
    # at twins give negative bounds. epsilon_max = ceil(ln 7) = 2, quality = 2^-floor(2 ln 2) = 1/2.
    assert same.epsilon == pytest.approx(math.log(2 - 8e-5), rel=1e-9)
    assert same.epsilon_max == 2.0 and same.quality == 0.5
    assert same.auc == pytest.approx(36 / 64)  # pairs with f_i < h_j: i <= j
    with pytest.raises(ValueError):
        forget_quality(np.array([0.1, 0.2]), np.array([1.0, 2.0, 3.0]))


def test_forget_sets_and_insertion():
    text = synthetic_play(80, seed=4)
    passages = corpus_passages(text, 5, 20, seed=0)
    assert len(set(passages)) == 5 and all(len(p) == 20 and p in text for p in passages)
    assert passages == corpus_passages(text, 5, 20, seed=0)
    for kind in ("random", "digits", "code"):
        canaries = make_canaries(kind, 4, 30, seed=1)
        assert len(set(canaries)) == 4 and all(len(c) == 30 for c in canaries)
        assert canaries == make_canaries(kind, 4, 30, seed=1) and canaries != make_canaries(kind, 4, 30, seed=2)
    assert set("".join(make_canaries("digits", 3, 30))) <= set("0123456789 ")
    canaries = make_canaries("code", 2, 30)
    inserted = insert_sequences(text, canaries, repeats=3, seed=0)
    assert len(inserted) == len(text) + 3 * sum(len(c) + 2 for c in canaries)
    assert all(inserted.count(c) == 3 for c in canaries)
    assert remove_sequences(inserted, canaries).replace("\n\n\n\n", "\n\n") == text
    assert remove_sequences(text, passages).count(passages[0]) == 0


def test_gradient_ascent_raises_forget_loss_and_ends_extraction():
    canaries = make_canaries("random", 6, 33, seed=7)
    model, tokenizer = train_with_canaries(canaries[:3], seed=7)
    forget = ForgetSet("canaries", in_distribution=False, examples=canaries[:3], holdout=canaries[3:])
    val_stream = tokenizer.encode_tensor(synthetic_play(40, seed=99))
    before = sequence_losses(model, tokenizer, forget.examples)
    trace = gradient_ascent_trace(model, tokenizer, forget, val_stream, UnlearnConfig(steps=20, lr=1e-3,
                                                                                     eval_every=10), prefix_len=8)
    assert [p.step for p in trace] == [0, 10, 20]
    assert trace[0].forget_loss == pytest.approx(before.mean(), rel=1e-5)
    assert trace[0].extraction_rate == 1.0 and trace[0].quality == 0.0
    assert trace[-1].forget_loss > trace[0].forget_loss + 2.0
    assert trace[-1].extraction_rate == 0.0
    np.testing.assert_allclose(sequence_losses(model, tokenizer, forget.examples), before)  # input model untouched


@pytest.mark.slow
@pytest.mark.skipif(not _can_find_shakespeare(), reason="tiny-shakespeare is absent")
def test_bench_lm_unlearning_smoke(tmp_path):
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "simulations" / "bench_lm_unlearning.py"
    spec = importlib.util.spec_from_file_location("bench_lm_unlearning", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--out", str(tmp_path), "--train-steps", "10", "--train-chars", "50000", "--forget-size", "4",
            "--n-layer", "1", "--n-embd", "32", "--block-size", "32", "--example-len", "32", "--prefix-len", "8",
            "--unlearn-steps", "4", "--eval-every", "2", "--val-windows", "4"]
    bench.main(args)
    for name in ("trace.csv", "examples.csv", "training.csv", "summary.json", "unlearning.png", "vocab.json"):
        assert (tmp_path / name).is_file()
    with (tmp_path / "trace.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 0, 2, 4]
    bench.main([*args, "--reuse-models"])  # the saved models load back
