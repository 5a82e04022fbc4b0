"""Strategies called directly with fake client replies: aggregation, and every kind of bad reply."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict

from fedsparse import sparse, transport
from fedsparse.client import corrupt_reply
from fedsparse.config import resolve
from fedsparse.models import build_model, maskable_names
from server.strategies import STRATEGIES
from server.strategies.base import Channel
from tests.conftest import reply_to


class FakeGrid:
    def __init__(self, replies=()):
        self.replies = list(replies)

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, timeout=None):
        return self.replies


def make_strategy(name: str, **overrides):
    cfg = resolve({"strategy": name, "dataset": "digits", **overrides})
    model = build_model("cnn", (1, 16, 16), 10, seed=0)
    layout = sparse.Layout.of(model.state_dict(), maskable_names(model))
    strategy = STRATEGIES[name](cfg, layout)
    return strategy, {k: v.clone() for k, v in model.state_dict().items()}


def client_reply(strategy, state, node_id: int, n: int, scale: float, dtype: str = "float32"):
    """What an honest client whose trained model is `scale` x the global one returns: its update."""
    strategy.global_state = state
    values, dense = sparse.gather({k: v * (scale - 1) for k, v in state.items()}, strategy.layout, strategy.masks)
    content = RecordDict({
        "arrays": transport.make_payload(values, dense, dtype),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, "partition-id": node_id}),
        "config": ConfigRecord({"mask-fingerprint": strategy.fingerprint}),
    })
    return reply_to(content, node_id)


def test_fedavg_is_the_example_weighted_mean(task_identity):
    strategy, state = make_strategy("fedavg")
    replies = [client_reply(strategy, state, 1, 10, 1.0), client_reply(strategy, state, 2, 30, 2.0),
               client_reply(strategy, state, 3, 60, -1.0)]
    new, metrics = strategy.aggregate_train(1, replies, Channel(FakeGrid(), 1.0))
    expected_scale = (10 * 1.0 + 30 * 2.0 + 60 * -1.0) / 100
    for k, v in state.items():
        torch.testing.assert_close(new[k], v * expected_scale, rtol=1e-5, atol=1e-6)
    assert metrics["accepted"] == 3


def with_random_mask(task_identity_unused=None, dtype="float16"):
    strategy, state = make_strategy("random", **{"value-dtype": dtype, "sparsity": 0.9})
    channel = Channel(FakeGrid(), 1.0)
    strategy.installed = True  # skip the install messages: no clients here
    state = strategy.setup(channel, {}, state, 1)
    return strategy, state


def test_sparse_aggregation_stays_on_the_mask(task_identity):
    strategy, state = with_random_mask()
    replies = [client_reply(strategy, state, 1, 5, 2.0, "float16"), client_reply(strategy, state, 2, 15, 4.0,
                                                                                   "float16")]
    new, _ = strategy.aggregate_train(1, replies, Channel(FakeGrid(), 1.0))
    for k in strategy.layout.maskable:
        assert torch.all(new[k][~strategy.masks[k]] == 0)
        torch.testing.assert_close(new[k], state[k] * 3.5, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("fault", ["wrong-length", "wrong-dtype", "nan", "missing-key", "stale-fingerprint"])
def test_a_bad_reply_is_rejected_logged_and_the_round_goes_on(task_identity, fault, caplog):
    strategy, state = with_random_mask()
    good = client_reply(strategy, state, 1, 10, 2.0, "float16")
    bad = client_reply(strategy, state, 2, 10, 5.0, "float16")
    corrupt_reply(bad.content, fault)
    channel = Channel(FakeGrid(), 1.0)
    new, metrics = strategy.aggregate_train(1, [good, bad], channel)
    assert metrics["accepted"] == 1
    assert len(channel.failures) == 1 and channel.failures[0]["node_id"] == 2
    assert "rejected reply" in channel.failures[0]["reason"]
    assert "node 2" in caplog.text
    for k in strategy.layout.maskable:  # the good client alone
        torch.testing.assert_close(new[k], state[k] * 2.0, rtol=2e-3, atol=1e-4)


def test_foreign_mask_and_wrong_example_count_are_rejected(task_identity):
    strategy, state = with_random_mask()
    foreign = client_reply(strategy, state, 1, 10, 1.0, "float16")
    foreign.content["config"] = ConfigRecord({"mask-fingerprint": "deadbeefdeadbeef"})
    negative = client_reply(strategy, state, 2, 10, 1.0, "float16")
    negative.content["metrics"]["num-examples"] = -4
    inf = client_reply(strategy, state, 3, 10, 1.0, "float16")
    inf.content["arrays"]["dense"] = Array(np.full(strategy.layout.num_dense, np.inf, dtype=np.float16))
    channel = Channel(FakeGrid(), 1.0)
    new, metrics = strategy.aggregate_train(1, [foreign, negative, inf], channel)
    assert new is None and metrics["accepted"] == 0  # the loop then keeps the global model unchanged
    reasons = " ".join(f["reason"] for f in channel.failures)
    assert "fingerprint" in reasons and "num-examples" in reasons and "NaN or Inf" in reasons


def test_ssfl_mask_is_the_topk_of_the_weighted_mean_score(task_identity):
    strategy, state = make_strategy("ssfl", sparsity=0.8)
    n = strategy.layout.num_maskable
    rng = np.random.default_rng(0)
    s1, s2 = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)

    def scores(node, s, examples):
        from flwr.app import ArrayRecord

        return reply_to(RecordDict({"scores": ArrayRecord({"saliency": Array(s)}),
                                    "metrics": MetricRecord({"num-examples": examples, "partition-id": node})}),
                        node, "query.saliency")

    grid = FakeGrid([scores(1, s1, 10), scores(2, s2, 30)])
    masks = strategy.make_mask(Channel(grid, 1.0), {0: 1, 1: 2}, state)
    mean = torch.from_numpy((10 * s1.astype(np.float64) + 30 * s2) / 40).float()
    expected = sparse.topk_mask(sparse.split_flat(mean, strategy.layout, strategy.layout.maskable), 0.2)
    assert all(torch.equal(masks[k], expected[k]) for k in expected)
    assert abs(sparse.density_of(masks) - 0.2) < 1e-5
