"""Merging: hand-computed checks of the general task-vector merge (TA, TIES, DARE), WiSE-FT, TALL/consensus,
scale selection, non-float entries, and TACT's statistics correction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsparse.merging import (
    MERGE_METHODS,
    MergeError,
    MergeSettings,
    TACTModel,
    choose_scale,
    consensus_mask,
    consensus_merge,
    elect_signs,
    expert_statistics,
    magnitude_trim,
    merge_models,
    merge_task_vectors,
    record_channel_stats,
    tall_masks,
    tall_reconstruct,
    task_vector,
    wise_ft,
)


def state(**entries) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(value) for key, value in entries.items()}


def test_task_arithmetic_one_expert_lambda_one_is_the_expert():
    torch.manual_seed(0)
    base = {"w": torch.randn(5, 3), "b": torch.randn(5), "steps": torch.tensor(7)}
    expert = {"w": torch.randn(5, 3), "b": torch.randn(5), "steps": torch.tensor(7)}
    merged = merge_models(base, [expert], "task_arithmetic", scale=1.0)
    torch.testing.assert_close(merged["w"], expert["w"], rtol=0, atol=1e-6)
    torch.testing.assert_close(merged["b"], expert["b"], rtol=0, atol=1e-6)
    assert merged["steps"].dtype == torch.int64 and int(merged["steps"]) == 7


def test_task_arithmetic_sums_scaled_vectors():
    base = state(w=[1.0, 1.0])
    experts = [state(w=[2.0, 0.0]), state(w=[3.0, 1.5])]
    merged = merge_models(base, experts, "task_arithmetic", scale=0.5)
    assert merged["w"].tolist() == [1.0 + 0.5 * (1.0 + 2.0), 1.0 + 0.5 * (-1.0 + 0.5)]


# Three experts, base 0, split into two tensors so that the TIES trim is global over the whole vector:
#   tau1 = [4, -1 | 0.5, -3]   top-2 by |.|: [4, 0 | 0, -3]
#   tau2 = [2,  3 | -0.2, 1]   top-2:        [2, 3 | 0,  0]
#   tau3 = [-1, -5 | 0.1, 2]   top-2:        [0, -5 | 0, 2]
#   sum of trimmed = [6, -2 | 0, -1] -> elected [+, -, (0 -> majority), -]; majority = sign(1 - 1 - 1) = -
#   disjoint mean over agreeing non-zeros: [mean(4, 2), -5 | 0, -3] = [3, -5 | 0, -3]
TIES_EXPERTS = [state(a=[4.0, -1.0], b=[0.5, -3.0]), state(a=[2.0, 3.0], b=[-0.2, 1.0]),
                state(a=[-1.0, -5.0], b=[0.1, 2.0])]


def test_ties_trim_elect_disjoint_mean_by_hand():
    base = state(a=[0.0, 0.0], b=[0.0, 0.0])
    settings = MergeSettings(sparsify="magnitude", density=0.5, sign_consensus="ties", aggregate="disjoint_mean")
    merged = merge_models(base, TIES_EXPERTS, settings)
    assert merged["a"].tolist() == [3.0, -5.0]
    assert merged["b"].tolist() == [0.0, -3.0]
    offset = merge_models(state(a=[1.0, 1.0], b=[1.0, 1.0]),
                          [{key: value + 1 for key, value in expert.items()} for expert in TIES_EXPERTS],
                          settings, scale=2.0)
    assert offset["a"].tolist() == [7.0, -9.0] and offset["b"].tolist() == [1.0, -5.0]


def test_ties_trim_per_tensor_differs_from_global():
    trimmed = magnitude_trim(task_vector(TIES_EXPERTS[1], state(a=[0.0, 0.0], b=[0.0, 0.0])), 0.5, scope="tensor")
    assert trimmed["a"].tolist() == [0.0, 3.0]
    assert trimmed["b"].tolist() == [0.0, 1.0]  # the global trim keeps [2, 3 | 0, 0] instead


def test_elect_signs_resolves_zero_sums_to_the_majority():
    positive = elect_signs([state(w=[2.0, 1.0, 1.0]), state(w=[-2.0, 1.0, 1.0])])
    assert positive["w"].tolist() == [1.0, 1.0, 1.0]
    negative = elect_signs([state(w=[2.0, -1.0]), state(w=[-2.0, -1.0])])
    assert negative["w"].tolist() == [-1.0, -1.0]


def test_method_registry_holds_settings_of_one_merge():
    assert set(MERGE_METHODS) >= {"task_arithmetic", "ties", "dare_ta", "dare_ties"}
    assert MERGE_METHODS["ties"].sign_consensus == "ties" and MERGE_METHODS["ties"].sparsify == "magnitude"
    assert MERGE_METHODS["dare_ties"].sparsify == "dare" and MERGE_METHODS["dare_ties"].aggregate == "disjoint_mean"
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_models(state(w=[0.0]), [state(w=[1.0])], "nope")
    with pytest.raises(ValueError, match="density"):
        MergeSettings(sparsify="dare", density=0.0)


def test_dare_keeps_the_expectation_over_many_seeds():
    """Each entry is tau / q with probability q, else 0: mean tau, variance tau^2 (1/q - 1). Over N seeds the mean's
    standard error is |tau| sqrt((1/q - 1) / N); every entry must be within 5 of them (and without the 1/q rescale
    the mean would be off by (1 - q) tau, more than 50 standard errors here)."""
    torch.manual_seed(1)
    tau = {"w": torch.randn(40)}
    keep, seeds = 0.3, 2000
    settings = MergeSettings(sparsify="dare", density=keep)
    draws = torch.stack([merge_task_vectors([tau], settings, seed=seed)["w"] for seed in range(seeds)])
    values = set(torch.unique(torch.round(draws / tau["w"] * keep, decimals=4)).tolist())
    assert values <= {0.0, 1.0}
    standard_error = tau["w"].abs() * math.sqrt((1 / keep - 1) / seeds)
    assert bool(((draws.mean(0) - tau["w"]).abs() <= 5 * standard_error).all())
    kept_fraction = float((draws != 0).float().mean())
    assert abs(kept_fraction - keep) < 5 * math.sqrt(keep * (1 - keep) / draws.numel())
    same = merge_task_vectors([tau], settings, seed=3)["w"]
    assert torch.equal(same, draws[3]) and not torch.equal(draws[3], draws[4])


def test_dare_draws_independent_masks_per_expert():
    tau = {"w": torch.ones(200)}
    first, second = (merge_task_vectors([tau, tau], MergeSettings(sparsify="dare", density=0.5), seed=0)
                     for _ in range(2))
    assert torch.equal(first["w"], second["w"])
    single = merge_task_vectors([tau], MergeSettings(sparsify="dare", density=0.5), seed=0)["w"]
    assert set(first["w"].unique().tolist()) == {0.0, 2.0, 4.0}  # two different masks overlap partially
    assert not torch.equal(first["w"], 2 * single)


def test_mean_and_disjoint_mean_aggregates():
    vectors = [state(w=[2.0, 0.0, -1.0]), state(w=[4.0, 0.0, 0.0])]
    assert merge_task_vectors(vectors, MergeSettings(aggregate="mean"))["w"].tolist() == [3.0, 0.0, -0.5]
    assert merge_task_vectors(vectors, MergeSettings(aggregate="disjoint_mean"))["w"].tolist() == [3.0, 0.0, -1.0]


def test_non_float_entries_must_agree_and_are_copied():
    base = {"w": torch.zeros(2), "count": torch.tensor([3, 4])}
    good = {"w": torch.ones(2), "count": torch.tensor([3, 4])}
    merged = merge_models(base, [good, good], "ties", scale=1.0)
    assert torch.equal(merged["count"], base["count"]) and merged["count"] is not base["count"]
    bad = {"w": torch.ones(2), "count": torch.tensor([3, 5])}
    with pytest.raises(MergeError, match="non-float entry"):
        merge_models(base, [good, bad])
    with pytest.raises(MergeError, match="shape"):
        merge_models(base, [{"w": torch.ones(3), "count": torch.tensor([3, 4])}])


def test_excluded_heads_keep_the_base_values():
    base = {"body.weight": torch.zeros(2), "head.weight": torch.zeros(2)}
    expert = {"body.weight": torch.ones(2), "head.weight": torch.ones(2)}
    merged = merge_models(base, [expert], scale=1.0, exclude=("head",))
    assert merged["body.weight"].tolist() == [1.0, 1.0] and merged["head.weight"].tolist() == [0.0, 0.0]


def test_wise_ft_interpolates():
    zero_shot, fine_tuned = state(w=[0.0, 2.0]), state(w=[4.0, 6.0])
    assert wise_ft(zero_shot, fine_tuned, 0.0)["w"].tolist() == [0.0, 2.0]
    assert wise_ft(zero_shot, fine_tuned, 1.0)["w"].tolist() == [4.0, 6.0]
    assert wise_ft(zero_shot, fine_tuned, 0.25)["w"].tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(zero_shot, fine_tuned, 1.5)


# TALL by hand, base 0, lambda 0.5: tau1 = [1, 0.25, -2], tau2 = [1, -3, 2], tau_MTL = [2, -2.75, 0].
#   m1: |tau1| > 0.5 |tau_MTL - tau1| = 0.5 [1, 3, 2]       -> [T, F, T]
#   m2: |tau2| > 0.5 |tau_MTL - tau2| = 0.5 [1, 0.25, 2]    -> [T, T, T]
#   consensus (>= 2 tasks): [T, F, T]; consensus TA at scale 1: [2, 0, 0]
def test_tall_masks_and_consensus_by_hand():
    base = state(w=[0.0, 0.0, 0.0])
    experts = [state(w=[1.0, 0.25, -2.0]), state(w=[1.0, -3.0, 2.0])]
    masks = tall_masks(base, experts, thresholds=0.5)
    assert masks[0]["w"].tolist() == [True, False, True]
    assert masks[1]["w"].tolist() == [True, True, True]
    multi_task = {"w": torch.tensor([2.0, -2.75, 0.0])}
    assert tall_reconstruct(base, multi_task, masks[0])["w"].tolist() == [2.0, 0.0, 0.0]
    assert tall_reconstruct(base, multi_task, masks[1])["w"].tolist() == [2.0, -2.75, 0.0]
    assert consensus_mask(masks, 2)["w"].tolist() == [True, False, True]
    assert consensus_mask(masks, 1)["w"].tolist() == [True, True, True]
    merged = consensus_merge(base, experts, "task_arithmetic", min_tasks=2, threshold=0.5, scale=1.0)
    assert merged["w"].tolist() == [2.0, 0.0, 0.0]
    per_task = tall_masks(base, experts, thresholds=[0.5, 10.0])
    assert per_task[1]["w"].tolist() == [False, True, False]  # only 3 > 10 * 0.25


def test_choose_scale_picks_the_best_grid_value():
    base, expert = state(w=[0.0]), state(w=[1.0])
    grid = [round(0.1 * step, 1) for step in range(1, 11)]
    choice = choose_scale(lambda scale: merge_models(base, [expert], scale=scale),
                          lambda merged: -float((merged["w"][0] - 0.3) ** 2), grid)
    assert choice.best == 0.3 and len(choice.scores) == 10
    with pytest.raises(ValueError, match="empty"):
        choose_scale(lambda scale: base, lambda merged: 0.0, [])


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def test_tact_matches_the_experts_statistics_per_task():
    experts = [small_net(seed) for seed in (1, 2)]
    merged = small_net(0)
    merged.load_state_dict(merge_models(small_net(0).state_dict(), [e.state_dict() for e in experts], scale=0.5,
                                        exclude=("4",)))
    generator = torch.Generator().manual_seed(0)
    data = {"t0": [torch.randn(64, 6, generator=generator) for _ in range(2)],
            "t1": [torch.randn(64, 6, generator=generator) * 2 + 1 for _ in range(2)]}
    layers = ["0", "2"]
    tact = TACTModel(merged, layers, head="4")
    targets = {}
    for task, expert in zip(data, experts, strict=True):
        targets[task] = expert_statistics(expert, layers, data[task])
        tact.add_task(task, targets[task], data[task], head=expert[4])
    before = record_channel_stats(merged, layers, data["t0"])
    assert float((before["2"].std - targets["t0"]["2"].std).abs().max()) > 1e-2  # there is something to correct
    for task, expert in zip(data, experts, strict=True):
        tact.use_task(task)
        after = record_channel_stats(tact.merged, layers, data[task])
        for layer in layers:
            torch.testing.assert_close(after[layer].mean, targets[task][layer].mean, rtol=0, atol=1e-4)
            torch.testing.assert_close(after[layer].std, targets[task][layer].std, rtol=0, atol=1e-4)
        torch.testing.assert_close(tact(data[task][0], task), expert[4](tact.merged[:4](data[task][0])))
    tact.use_task(None)
    torch.testing.assert_close(tact(data["t0"][0]), merged(data["t0"][0]))
