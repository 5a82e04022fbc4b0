"""Synthetic facts, mechanistic localizations and masked unlearning on a tiny untrained LM (2 layers, 48 dims).

None of these checks needs a trained model: they are exact properties (counts, disjointness, bit-identity, zero
self-patching effect), so they run in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedsparse.lm.facts import (
    PROMPT_FORMATS,
    SPORTS,
    check_attributes,
    facts_text,
    make_facts,
    relearn_split,
    render_fact,
    render_prompt,
    split_facts,
    subject_span,
)
from fedsparse.lm.mechanistic import (
    Component,
    EditConfig,
    PatchingBatch,
    _log1mexp,
    all_components,
    answer_logprobs,
    edit_targets,
    evaluate_facts,
    localize_all,
    localize_all_mlps,
    localize_all_weights,
    localize_attribution_patching,
    localize_causal_tracing,
    localize_lookup_mlps,
    localize_random,
    make_patching_batches,
    mask_count,
    match_parameter_count,
    patch_effect,
    relearn_attack,
    unlearn_facts,
)
from fedsparse.lm.model import GPT, GPTConfig
from fedsparse.lm.tokenizer import CharTokenizer

CORPUS = "the king and queen of a fair land speak to my lord who doth not hear thee now\n" * 40
N_EMBD = 48
N_LAYER = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup() -> tuple[GPT, CharTokenizer, list]:
    torch.manual_seed(0)
    facts = make_facts(12, seed=3)
    tokenizer = CharTokenizer.from_texts(CORPUS, facts_text(facts, CORPUS, 1), "abcdefghijklmnopqrstuvwxyzBDFGKLMNPRSTVZ")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=N_LAYER, n_head=2, n_embd=N_EMBD))
    model.eval()
    return model, tokenizer, facts


def test_facts_are_seeded_distinct_and_render_in_every_format(setup) -> None:
    _, tokenizer, facts = setup
    assert make_facts(12, seed=3) == facts
    assert len({fact.subject for fact in facts}) == len(facts)
    assert {fact.attribute for fact in facts} == set(SPORTS)  # 12 facts cycle through all 6 sports
    for fact in facts:
        for index, template in enumerate(PROMPT_FORMATS):
            prompt = render_prompt(fact.subject, index)
            assert prompt == "\n" + template.format(subject=fact.subject)
            span = subject_span(fact, index)
            assert prompt[span.start:span.stop] == fact.subject
            assert render_fact(fact, index) == prompt + fact.attribute + ".\n"
            assert tokenizer.decode(tokenizer.encode(render_fact(fact, index))) == render_fact(fact, index)
    text = facts_text(facts, CORPUS, repeats=2, corpus_chunk=30)
    for fact in facts:
        for index in range(len(PROMPT_FORMATS)):
            assert text.count(render_fact(fact, index)) == 2
    with pytest.raises(ValueError):
        check_attributes(["golf", "gymnastics"])


def test_forget_maintain_and_relearning_splits_are_disjoint_and_cover(setup) -> None:
    _, _, facts = setup
    splits = split_facts(facts, 5, seed=1)
    assert not set(splits.forget) & set(splits.maintain)
    assert sorted(splits.all, key=facts.index) == facts
    for size in (4, 5):
        forgotten = splits.all[:size]
        split = relearn_split(forgotten, seed=2)
        assert not set(split.relearn) & set(split.heldout)
        assert set(split.relearn) | set(split.heldout) == set(forgotten)
        assert len(split.relearn) == math.ceil(size / 2) and len(split.heldout) == size // 2
        assert relearn_split(forgotten, seed=2) == split
    with pytest.raises(ValueError):
        relearn_split(facts[:1])


def test_patching_a_run_into_itself_has_zero_effect(setup) -> None:
    model, tokenizer, facts = setup
    batch = make_patching_batches(facts, tokenizer)[0]
    self_batch = PatchingBatch(batch.clean, batch.clean.clone(), batch.target, batch.subject_positions)
    every_position = range(batch.clean.shape[1])
    for component in all_components(model):
        assert torch.equal(patch_effect(model, self_batch, component, every_position), torch.zeros(len(batch.target)))
    # The check can fail: restoring a real clean run into its corrupted twin does move the metric.
    assert patch_effect(model, batch, Component("mlp", 0), batch.subject_positions).abs().sum() > 0


def test_patching_batches_corrupt_only_the_subject(setup) -> None:
    _, tokenizer, facts = setup
    for batch in make_patching_batches(facts, tokenizer, format_index=1):
        differs = (batch.clean != batch.corrupt).any(dim=0).nonzero().squeeze(1).tolist()
        assert set(differs) <= set(batch.subject_positions)
        assert (batch.clean[:, list(batch.subject_positions)] != batch.corrupt[:, list(batch.subject_positions)]).all()


def test_each_localization_has_exactly_the_requested_parameter_count(setup) -> None:
    model, tokenizer, facts = setup
    batches = make_patching_batches(facts, tokenizer)
    mlp_size = 2 * N_EMBD * 4 * N_EMBD + 4 * N_EMBD + N_EMBD
    assert localize_lookup_mlps(model, batches, layers=1).parameter_count == mlp_size
    for count in (1, 1000, mlp_size, mlp_size + 777):
        assert localize_lookup_mlps(model, batches, 1, parameter_count=count).parameter_count == count
        assert localize_causal_tracing(model, batches, count).parameter_count == count
        assert localize_attribution_patching(model, batches, count).parameter_count == count
        assert localize_random(model, count, seed=4).parameter_count == count
        assert localize_all_mlps(model, count).parameter_count == count
        assert localize_all_weights(model, count).parameter_count == count
    matched = localize_all(model, batches, lookup_layers=1)
    assert {name: loc.parameter_count for name, loc in matched.items() if name not in ("all_mlps", "all_weights")} \
        == dict.fromkeys(["lookup_mlps", "causal_tracing", "attribution_patching", "random"], mlp_size)
    assert matched["all_weights"].parameter_count == model.num_parameters()


def test_all_mlps_mask_covers_exactly_the_mlp_parameters(setup) -> None:
    model, _, _ = setup
    mask = localize_all_mlps(model).mask
    for name, values in mask.items():
        assert bool(values.all()) == (".mlp." in name) and bool(values.any()) == (".mlp." in name), name
    assert mask_count(mask) == N_LAYER * (2 * N_EMBD * 4 * N_EMBD + 4 * N_EMBD + N_EMBD)


def test_match_parameter_count_pads_only_from_the_pool(setup) -> None:
    model, _, _ = setup
    mlps = localize_all_mlps(model).mask
    one_mlp = match_parameter_count(mlps, 100, seed=0)
    padded = match_parameter_count(one_mlp, 5000, seed=1, pool=mlps)
    assert mask_count(padded) == 5000
    assert all(bool((padded[name] <= mlps[name]).all()) for name in mlps)
    assert all(bool((one_mlp[name] <= padded[name]).all()) for name in mlps)  # padding keeps what was there
    with pytest.raises(ValueError):
        match_parameter_count(one_mlp, mask_count(mlps) + 1, pool=mlps)


@pytest.mark.parametrize("edit", [False, True])
def test_unlearning_changes_only_masked_parameters(setup, edit: bool) -> None:
    model, tokenizer, facts = setup
    model = GPT(model.config)
    model.load_state_dict(setup[0].state_dict())
    splits = split_facts(facts, 4, seed=0)
    mask = localize_random(model, 3000, seed=5).mask
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    targets = edit_targets(splits.forget, SPORTS) if edit else None
    assert targets is None or all(t != f.attribute for t, f in zip(targets, splits.forget))
    losses = unlearn_facts(model, tokenizer, mask, splits, tokenizer.encode_tensor(CORPUS),
                           EditConfig(steps=4, lr=1e-2), targets=targets)
    assert len(losses) == 4 and losses[-1] < losses[0]
    changed = 0
    for name, param in model.named_parameters():
        assert torch.equal(param.detach()[~mask[name]], before[name][~mask[name]]), name
        changed += int((param.detach() != before[name]).sum())
    assert changed > 0.9 * 3000
    report = evaluate_facts(model, tokenizer, splits, tokenizer.encode_tensor(CORPUS), targets=targets, val_windows=4)
    assert len(report.forget) == len(PROMPT_FORMATS) and report.val_perplexity > 1


def test_answer_logprobs_match_unpadded_rows(setup) -> None:
    model, tokenizer, facts = setup
    prompts = [render_prompt(f.subject, i % 3) for i, f in enumerate(facts[:5])]
    answers = [f.attribute + "." for f in facts[:5]]
    batched = answer_logprobs(model, tokenizer, prompts, answers)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        tokens = torch.tensor([tokenizer.encode(prompt + answer)])
        logprobs = torch.log_softmax(model(tokens[:, :-1]), dim=-1)[0]
        first = len(prompt) - 1
        expected = sum(float(logprobs.detach()[first + j, tokens[0, first + j + 1]]) for j in range(len(answer)))
        assert float(batched[row].detach()) == pytest.approx(expected, abs=1e-4)
    log_p = torch.tensor([-1e-3, -0.5, -2.0, -30.0])
    assert torch.allclose(_log1mexp(log_p), torch.log(1 - torch.exp(log_p.double())).float(), rtol=1e-4)


def test_relearning_attack_leaves_the_attacked_model_unchanged(setup) -> None:
    model, tokenizer, facts = setup
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    result = relearn_attack(model, tokenizer, relearn_split(facts[:6]), tokenizer.encode_tensor(CORPUS), steps=2)
    assert len(result.before) == len(result.after) == len(result.relearned) == len(PROMPT_FORMATS)
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())
