"""The mask options that had no test: the magnitude mask (function and strategy), mask-scope=layerwise,
saliency-aggregation=mean vs weighted, and lr-decay. Hand-built cases and independent computations only: each test
names the bug it would catch."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedsparse import sparse, transport
from fedsparse.replies import NodeInfo
from tests.test_strategies import FakeGrid, bound, make_strategy, saliency_reply


def brute_force_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest scores, ties to the earlier position, by a plain Python sort (independent of topk_mask)."""
    order = sorted(range(scores.size), key=lambda i: (-float(scores[i]), i))
    keep = np.zeros(scores.size, dtype=bool)
    keep[order[:k]] = True
    return keep


def flat_mask(masks: sparse.Masks, names) -> np.ndarray:
    return np.concatenate([masks[k].reshape(-1).numpy() for k in names])


# ---- the magnitude mask, as a function

def test_magnitude_mask_keeps_the_largest_absolute_values_by_hand():
    state = {"a": torch.tensor([[0.1, -5.0], [2.0, -0.3]]), "b": torch.tensor([-4.0, 0.2, 3.0, -0.05]),
             "bias": torch.tensor([100.0])}
    masks = sparse.magnitude_mask(state, ("a", "b"), 3 / 8)
    # |w| ranked: 5 (a[0,1]), 4 (b[0]), 3 (b[2]), 2 ...: by value (not |w|) b[0] = -4 would be last
    assert masks["a"].tolist() == [[False, True], [False, False]]
    assert masks["b"].tolist() == [True, False, True, False]
    assert set(masks) == {"a", "b"}  # the dense bias is never masked


def test_magnitude_mask_ties_that_would_empty_a_tensor_are_refused_naming_it():
    # 4 places: 2, then three of the six |w| = 1 ties in mask order (a[0], a[1], b[0,0]): c keeps nothing
    state = {"a": torch.tensor([1.0, -1.0, 0.5]), "b": torch.tensor([[-1.0, 2.0], [1.0, -1.0]]),
             "c": torch.tensor([1.0, 1.0])}
    with pytest.raises(sparse.MaskError, match="no weight in c"):
        sparse.magnitude_mask(state, ("a", "b", "c"), 4 / 9)


def test_magnitude_mask_ties_are_deterministic_and_positional():
    state = {"a": torch.tensor([1.0, -1.0, 0.5]), "b": torch.tensor([[-1.0, 2.0], [1.0, -1.0]]),
             "c": torch.tensor([3.0, 1.0])}
    masks = sparse.magnitude_mask(state, ("a", "b", "c"), 5 / 9)
    # kept: c[0]=3, b[0,1]=2, then the |w| = 1 ties in mask order: a[0], a[1], b[0,0]; b[1,0], b[1,1], c[1] lose
    assert masks["a"].tolist() == [True, True, False]
    assert masks["b"].tolist() == [[True, True], [False, False]]
    assert masks["c"].tolist() == [True, False]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("density", [0.5, 0.2, 0.1])
def test_magnitude_mask_is_the_exact_topk_of_abs_weights(seed, density):
    gen = torch.Generator().manual_seed(seed)
    state = {"w1": torch.randn(20, 15, generator=gen), "w2": torch.randn(90, generator=gen),
             "w3": torch.randn(4, 4, 2, generator=gen)}
    state["w2"][:30] = -1.5  # many ties among the largest, negative
    state["w2"][30:40] = 1.5  # the same magnitude, positive
    names = ("w1", "w2", "w3")
    masks = sparse.magnitude_mask(state, names, density)
    flat_abs = np.concatenate([state[k].reshape(-1).abs().numpy() for k in names])
    k = round(density * flat_abs.size)
    assert int(flat_mask(masks, names).sum()) == k  # density exact
    assert np.array_equal(flat_mask(masks, names), brute_force_topk(flat_abs, k))


# ---- mask-scope=layerwise

def test_layerwise_keeps_each_tensors_own_share_and_differs_from_global_by_hand():
    scores = {"a": torch.tensor([0.1, 0.2, 0.3, 100.0]), "b": torch.arange(10.0, 90.0, 10.0)}  # b: 10..80
    layerwise = sparse.topk_mask(scores, 0.5, scope="layerwise")
    assert layerwise["a"].tolist() == [False, False, True, True]  # 2 of 4
    assert layerwise["b"].tolist() == [False] * 4 + [True] * 4  # 4 of 8: 50..80
    glob = sparse.topk_mask(scores, 0.5, scope="global")  # 6 of 12: 100, 80, 70, 60, 50, 40
    assert glob["a"].tolist() == [False, False, False, True]
    assert glob["b"].tolist() == [False] * 3 + [True] * 5


@pytest.mark.parametrize("strategy_name", ["random", "magnitude"])
def test_layerwise_strategies_give_every_tensor_exactly_its_share(task_identity, strategy_name):
    warmup = {"warmup-rounds": 0} if strategy_name == "magnitude" else {}
    strategy, state = bound(strategy_name, sparsity=0.9, **{"mask-scope": "layerwise", **warmup})
    masks = strategy.make_mask(FakeGrid(()), {}, state)
    for k in strategy.layout.maskable:
        n = int(np.prod(strategy.layout.shapes[k]))
        assert int(masks[k].sum()) == round(0.1 * n), k
        if strategy_name == "magnitude":  # each tensor's own largest |w|
            assert np.array_equal(masks[k].reshape(-1).numpy(),
                                  brute_force_topk(state[k].reshape(-1).abs().numpy(), round(0.1 * n)))
    glob, _ = bound(strategy_name, sparsity=0.9, **warmup)
    global_masks = glob.make_mask(FakeGrid(()), {}, state)
    assert any(not torch.equal(global_masks[k], masks[k]) for k in masks)  # the option changes the mask


# ---- the magnitude strategy: dense warm-up, then one fixed mask from the server's model

def sent_model(message, strategy, masks, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return transport.read_payload(message.content["arrays"], strategy.layout, masks, dtype)


def test_magnitude_strategy_trains_dense_during_warmup_then_fixes_the_mask_of_that_rounds_model(task_identity):
    strategy, initial = bound("magnitude", sparsity=0.8, **{"warmup-rounds": 2, "value-dtype": "float16",
                                                             "num-clients": 2, "min-clients": 1})
    grid = FakeGrid((0, 1))  # nodes 0 and 1 hold partitions 0 and 1, and echo the mask they are sent
    for server_round in (1, 2):  # warm-up: no mask, the whole model as float32, nothing installed
        messages = list(strategy.configure_train(server_round, ArrayRecord(initial), ConfigRecord(), grid))
        assert strategy.masks is None and strategy.value_dtype == "float32"
        values, dense = sent_model(messages[0], strategy, None, "float32")
        assert values.numel() == 0 and dense.numel() == strategy.layout.num_maskable + strategy.layout.num_dense
        assert messages[0].content["config"]["mask-fingerprint"] == sparse.NO_MASK
        assert torch.equal(dense, sparse.flatten(initial, strategy.layout.maskable + strategy.layout.dense))
    assert [m.metadata.message_type for m in grid.sent] == ["query.info"] * 2
    # the model after warm-up differs from the initial one: the mask must come from it
    gen = torch.Generator().manual_seed(5)
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in initial.items()}
    messages = list(strategy.configure_train(3, ArrayRecord(trained), ConfigRecord(), grid))
    masked_global = strategy.plans[3].global_state
    expected = sparse.magnitude_mask(trained, strategy.layout.maskable, 0.2)
    assert all(torch.equal(strategy.masks[k], expected[k]) for k in expected)
    assert any(not torch.equal(expected[k], sparse.magnitude_mask(initial, strategy.layout.maskable, 0.2)[k])
               for k in expected)
    for k in strategy.layout.maskable:  # off-mask weights pruned, on-mask ones untouched
        assert torch.equal(masked_global[k], torch.where(expected[k], trained[k], torch.zeros(())))
    for k in strategy.layout.dense:
        assert torch.equal(masked_global[k], trained[k])
    installs = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query.install_mask"]
    assert sorted(installs) == [0, 1] and strategy.holders == {0, 1}
    assert messages[0].content["config"]["mask-fingerprint"] == strategy.fingerprint != sparse.NO_MASK
    assert messages[0].content["config"]["value-dtype"] == "float16"
    assert sent_model(messages[0], strategy, expected, "float16")[0].numel() == round(0.2 * strategy.layout.num_maskable)
    # later rounds: a very different model, the same mask, nothing re-sent
    fingerprint, n_sent = strategy.fingerprint, len(grid.sent)
    flipped = {k: -10.0 * torch.rand(v.shape, generator=gen) for k, v in trained.items()}
    strategy.configure_train(4, ArrayRecord(flipped), ConfigRecord(), grid)
    assert strategy.fingerprint == fingerprint and len(grid.sent) == n_sent
    assert all(torch.equal(strategy.masks[k], expected[k]) for k in expected)


# ---- saliency-aggregation: weighted (by num-examples) vs mean, through SSFL's make_mask

def ssfl_mask(aggregation: str, replies, monkeypatch):
    """SSFL's mask from these saliency replies, and the per-tensor scores it ranked (captured from topk_mask)."""
    strategy, state = bound("ssfl", sparsity=0.9, **{"saliency-aggregation": aggregation})
    strategy.roster.known = {node: NodeInfo(node - 1, 100) for node in (1, 2, 3)}
    ranked = {}
    real_topk = sparse.topk_mask

    def recording_topk(scores, density, scope="global"):
        ranked.update(scores)
        return real_topk(scores, density, scope)

    monkeypatch.setattr(sparse, "topk_mask", recording_topk)
    masks = strategy.make_mask(FakeGrid(answer=lambda _: replies), {0: 1, 1: 2, 2: 3}, state)
    assert strategy.failures.records == []
    names = strategy.layout.maskable
    return flat_mask(masks, names), torch.cat([ranked[k].reshape(-1) for k in names]).numpy()


def test_weighted_and_mean_saliency_aggregation_by_hand(task_identity, monkeypatch):
    strategy, _ = bound("ssfl")
    n = strategy.layout.num_maskable
    rng = np.random.default_rng(0)
    noise = (rng.random((3, n)) * 0.01).astype(np.float32)  # no ties
    position = np.arange(n)
    first, second = position % 10 == 0, position % 10 == 5  # disjoint, spread over every tensor
    s1 = (noise[0] + 3.0 * first).astype(np.float32)  # 10 examples
    s2 = (noise[1] + 2.0 * second).astype(np.float32)  # 30 examples
    s3 = noise[2]  # 60 examples
    replies = [saliency_reply(3, 2, s3, 60), saliency_reply(1, 0, s1, 10), saliency_reply(2, 1, s2, 30)]

    weighted_mask, weighted_scores = ssfl_mask("weighted", replies, monkeypatch)
    mean_mask, mean_scores = ssfl_mask("mean", replies, monkeypatch)
    by_hand_weighted = (10 * s1.astype(np.float64) + 30 * s2 + 60 * s3) / 100
    by_hand_mean = (s1.astype(np.float64) + s2 + s3) / 3
    np.testing.assert_allclose(weighted_scores, by_hand_weighted, rtol=1e-6)
    np.testing.assert_allclose(mean_scores, by_hand_mean, rtol=1e-6)
    k = round(0.1 * n)
    assert np.array_equal(weighted_mask, brute_force_topk(by_hand_weighted.astype(np.float32), k))
    assert np.array_equal(mean_mask, brute_force_topk(by_hand_mean.astype(np.float32), k))
    # weighted: the 30-example client's set scores 0.6 vs 0.3 and wins; mean: 1.0 vs 0.67, the 10-example one wins
    assert k == int(second.sum()) <= int(first.sum())
    assert np.array_equal(weighted_mask, second) and not mean_mask[~first].any()


# ---- lr-decay

@pytest.mark.parametrize("strategy_name", ["fedavg", "random"])
def test_the_lr_sent_in_round_r_is_lr_times_decay_to_the_r_minus_1(task_identity, strategy_name):
    strategy, state = make_strategy(strategy_name, nodes=(1, 2), lr=0.1, **{"lr-decay": 0.5})
    grid = FakeGrid((1, 2))
    for server_round, expected in [(1, 0.1), (2, 0.05), (3, 0.025), (7, 0.1 / 64)]:
        messages = strategy.configure_train(server_round, ArrayRecord(state), ConfigRecord(), grid)
        assert [m.content["config"]["lr"] for m in messages] == [pytest.approx(expected, rel=1e-12)] * 2
        assert all(m.content["config"]["server-round"] == server_round for m in messages)
    undecayed, _ = make_strategy(strategy_name, nodes=(1,), lr=0.1)
    (message,) = undecayed.configure_train(9, ArrayRecord(state), ConfigRecord(), FakeGrid((1,)))
    assert message.content["config"]["lr"] == 0.1
