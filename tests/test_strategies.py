"""Strategies called directly with fake client replies: aggregation, and every kind of bad reply."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict

from fedsparse import sparse, transport
from fedsparse.config import resolve
from fedsparse.models import build_model, maskable_names
from fedsparse.replies import NodeInfo
from server.strategies import STRATEGIES
from server.strategies.base import Channel
from tests.conftest import reply_to
from tests.faults import TRAIN_FAULTS, corrupt_reply


class FakeGrid:
    def __init__(self, replies=()):
        self.replies = list(replies)

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, timeout=None):
        return self.replies


def make_strategy(name: str, **overrides):
    """A strategy on the digits cnn, round 1 prepared, nodes 1..4 discovered with partition = node id and
    100 examples each."""
    cfg = resolve({"strategy": name, "dataset": "digits", **overrides})
    model = build_model("cnn", (1, 16, 16), 10, seed=0)
    layout = sparse.Layout.of(model.state_dict(), maskable_names(model))
    strategy = STRATEGIES[name](cfg, layout)
    strategy.known = {node: NodeInfo(node, 100) for node in (1, 2, 3, 4)}
    strategy.server_round = 1
    return strategy, {k: v.clone() for k, v in model.state_dict().items()}


def client_reply(strategy, state, node_id: int, n: int, scale: float, dtype: str = "float32"):
    """What an honest client whose trained model is `scale` x the global one returns to round 1: its update."""
    strategy.global_state = state
    values, dense = sparse.gather({k: v * (scale - 1) for k, v in state.items()}, strategy.layout, strategy.masks)
    content = RecordDict({
        "arrays": transport.make_payload(values, dense, dtype),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, "partition-id": node_id}),
        "config": ConfigRecord({"mask-fingerprint": strategy.fingerprint, "server-round": 1}),
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


def with_random_mask(dtype="float16", **overrides):
    strategy, state = make_strategy("random", **{"value-dtype": dtype, "sparsity": 0.9, **overrides})
    channel = Channel(FakeGrid(), 1.0)
    state = strategy.setup(channel, {}, state, 1)  # no nodes: nothing to install
    return strategy, state


def test_sparse_aggregation_stays_on_the_mask(task_identity):
    """Checked against the unmasked model, not against what `scatter` writes: setup must prune the global model
    (a client's trained model is `scale` x the pruned one), the masked values and the dense tensors both move by
    the example-weighted mean (5 x 2 + 15 x 4) / 20 = 3.5, and only the mask's share travels."""
    _, original = make_strategy("random")
    strategy, state = with_random_mask()
    masks = strategy.masks
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round(0.1 * strategy.layout.num_maskable)
    for k in strategy.layout.maskable:
        assert torch.equal(state[k], torch.where(masks[k], original[k], torch.zeros(())))
    replies = [client_reply(strategy, state, 1, 5, 2.0, "float16"), client_reply(strategy, state, 2, 15, 4.0,
                                                                                   "float16")]
    assert replies[0].content["arrays"]["values"].numpy().size == kept
    new, _ = strategy.aggregate_train(1, replies, Channel(FakeGrid(), 1.0))
    for k in strategy.layout.maskable:
        expected = torch.where(masks[k], original[k] * 3.5, torch.zeros(()))
        torch.testing.assert_close(new[k], expected, rtol=2e-3, atol=1e-4)
    for k in strategy.layout.dense:
        torch.testing.assert_close(new[k], original[k] * 3.5, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("fault", TRAIN_FAULTS)
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


@pytest.mark.parametrize("field,value,reason", [
    ("partition-id", 2.0, "must be an integer"),          # a whole float is not an integer either
    ("partition-id", 3, "not the partition 2"),           # another client's partition
    ("num-examples", 101, "exceeds the 100"),             # more than it reported at discovery
    ("num-examples", [5, 6], "must be an integer"),
    ("train-loss", float("inf"), "must be finite"),
])
def test_each_malformed_metric_names_its_field(task_identity, field, value, reason):
    strategy, state = make_strategy("fedavg")
    bad = client_reply(strategy, state, 2, 10, 1.5)
    bad.content["metrics"][field] = value
    channel = Channel(FakeGrid(), 1.0)
    new, _ = strategy.aggregate_train(1, [bad], channel)
    assert new is None and field in channel.failures[0]["reason"] and reason in channel.failures[0]["reason"]


def test_a_reply_from_an_undiscovered_node_is_rejected(task_identity):
    strategy, state = make_strategy("fedavg")
    stranger = client_reply(strategy, state, 9, 10, 1.5)
    channel = Channel(FakeGrid(), 1.0)
    assert strategy.aggregate_train(1, [stranger], channel)[0] is None
    assert "never discovered" in channel.failures[0]["reason"]


def test_foreign_mask_and_wrong_example_count_are_rejected(task_identity):
    strategy, state = with_random_mask()
    foreign = client_reply(strategy, state, 1, 10, 1.0, "float16")
    foreign.content["config"]["mask-fingerprint"] = "deadbeefdeadbeef"
    negative = client_reply(strategy, state, 2, 10, 1.0, "float16")
    negative.content["metrics"]["num-examples"] = -4
    inf = client_reply(strategy, state, 3, 10, 1.0, "float16")
    inf.content["arrays"]["dense"] = Array(np.full(strategy.layout.num_dense, np.inf, dtype=np.float16))
    channel = Channel(FakeGrid(), 1.0)
    new, metrics = strategy.aggregate_train(1, [foreign, negative, inf], channel)
    assert new is None and metrics["accepted"] == 0  # the loop then fails the run, keeping the checkpoint
    reasons = " ".join(f["reason"] for f in channel.failures)
    assert "fingerprint" in reasons and "num-examples" in reasons and "NaN or Inf" in reasons


def test_an_update_far_outside_the_rounds_norms_is_rejected_and_the_bound_is_configurable(task_identity):
    def run(ratio):
        strategy, state = make_strategy("fedavg", **{"max-update-norm-ratio": ratio})
        replies = [client_reply(strategy, state, 1, 10, 1.5), client_reply(strategy, state, 2, 10, 0.5),
                   client_reply(strategy, state, 3, 10, 1.0 + 30)]  # update norms 0.5, 0.5, 30 (x |state|)
        channel = Channel(FakeGrid(), 1.0)
        new, metrics = strategy.aggregate_train(1, replies, channel)
        return state, new, metrics, channel

    state, new, metrics, channel = run(10.0)
    assert metrics["accepted"] == 2 and channel.failures[0]["node_id"] == 3
    assert "exceeds 10 x the round's median norm" in channel.failures[0]["reason"]
    for k, v in state.items():
        torch.testing.assert_close(new[k], v, rtol=1e-5, atol=1e-6)  # (+0.5 - 0.5) / 2
    assert run(100.0)[2]["accepted"] == 3 and run(0.0)[2]["accepted"] == 3  # above the bound; check off


def test_a_non_finite_aggregate_is_never_returned(task_identity):
    strategy, state = make_strategy("fedavg")
    big = {k: torch.full_like(v, 3e38) for k, v in state.items()}
    replies = [client_reply(strategy, big, 1, 10, 2.0), client_reply(strategy, big, 2, 10, 2.0)]  # +3e38 each
    channel = Channel(FakeGrid(), 1.0)
    new, metrics = strategy.aggregate_train(1, replies, channel)  # 3e38 + 3e38 overflows float32
    assert new is None and metrics["accepted"] == 0
    assert "not finite" in channel.failures[-1]["reason"]


def test_median_and_trimmed_mean_against_hand_computation():
    vectors = [torch.tensor([1.0, -5.0, 0.0]), torch.tensor([2.0, 7.0, 0.0]), torch.tensor([100.0, 1.0, 3.0]),
               torch.tensor([4.0, 2.0, -9.0])]
    assert sparse.coordinate_median(vectors).tolist() == [3.0, 1.5, 0.0]  # mean of the two middle values
    assert sparse.coordinate_median(vectors[:3]).tolist() == [2.0, 1.0, 0.0]
    # trim 0.25 of 4 = 1 value each end: sorted columns [1,2,4,100] [-5,1,2,7] [-9,0,0,3]
    assert sparse.trimmed_mean(vectors, 0.25).tolist() == [3.0, 1.5, 0.0]
    # trim 0.2 of 4 = 0 values: the plain mean
    assert sparse.trimmed_mean(vectors, 0.2).tolist() == [26.75, 1.25, -1.5]
    with pytest.raises(ValueError):
        sparse.trimmed_mean(vectors, 0.5)


@pytest.mark.parametrize("aggregation,scale", [
    ("median", 2.0),                           # updates +1, +0.9, +1, +1.1, -8: median +1
    ("trimmed-mean", 1.0 + (0.9 + 1 + 1) / 3),  # 0.2 x 5 = 1 value off each end (-8 and +1.1)
    ("mean", 1.0 + (1 + 0.9 + 1 + 1.1 - 8) / 5),  # equal weights: the poisoned update drags it below 1
])
def test_robust_aggregation_bounds_a_poisoned_update(task_identity, aggregation, scale):
    """Five clients with equal weights, one of them sending -8 x the model (the norm screen is off)."""
    strategy, state = make_strategy("fedavg", aggregation=aggregation, **{"trim-fraction": 0.2,
                                                                          "max-update-norm-ratio": 0.0})
    strategy.known[5] = NodeInfo(5, 100)
    replies = [client_reply(strategy, state, i + 1, 10, s) for i, s in enumerate([2.0, 1.9, 2.0, 2.1, -7.0])]
    new, metrics = strategy.aggregate_train(1, replies, Channel(FakeGrid(), 1.0))
    assert metrics["accepted"] == 5
    for k, v in state.items():
        torch.testing.assert_close(new[k], v * scale, rtol=1e-5, atol=1e-6)


def test_ssfl_mask_is_the_topk_of_the_weighted_mean_score(task_identity):
    strategy, state = make_strategy("ssfl", sparsity=0.8)
    n = strategy.layout.num_maskable
    rng = np.random.default_rng(0)
    s1, s2 = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    strategy.known = {1: NodeInfo(0, 10), 2: NodeInfo(1, 30)}
    grid = FakeGrid([saliency_reply(1, 0, s1, 10), saliency_reply(2, 1, s2, 30)])
    masks = strategy.make_mask(Channel(grid, 1.0), {0: 1, 1: 2}, state)
    mean = torch.from_numpy((10 * s1.astype(np.float64) + 30 * s2) / 40).float()
    expected = sparse.topk_mask(sparse.split_flat(mean, strategy.layout, strategy.layout.maskable), 0.2)
    assert all(torch.equal(masks[k], expected[k]) for k in expected)
    assert abs(sparse.density_of(masks) - 0.2) < 1e-5


def saliency_reply(node: int, partition: int, scores: np.ndarray, examples: int):
    from flwr.app import ArrayRecord

    return reply_to(RecordDict({"scores": ArrayRecord({"saliency": Array(scores)}),
                                "metrics": MetricRecord({"num-examples": examples, "partition-id": partition})}),
                    node, "query.saliency")


@pytest.mark.parametrize("breakage,reason", [
    ("no-scores", "lacks the record 'scores'"),
    ("scores-as-metrics", "record 'scores' is a MetricRecord"),
    ("no-metrics", "lacks the record 'metrics'"),
    ("huge-num-examples", "exceeds the 10"),
    ("other-partition", "not the partition 0"),
    ("nan-partition", "must be an integer"),
    ("wrong-shape", "shape"),
])
def test_a_malformed_saliency_reply_is_rejected_and_the_others_build_the_mask(task_identity, breakage, reason):
    strategy, state = make_strategy("ssfl", sparsity=0.8)
    n = strategy.layout.num_maskable
    s1 = np.random.default_rng(1).random(n).astype(np.float32)
    strategy.known = {1: NodeInfo(0, 10), 2: NodeInfo(1, 30)}
    bad = saliency_reply(1, 0, np.ones(n, np.float32), 10)
    content = bad.content
    if breakage == "no-scores":
        del content["scores"]
    elif breakage == "scores-as-metrics":
        content["scores"] = MetricRecord({"saliency": 1.0})
    elif breakage == "no-metrics":
        del content["metrics"]
    elif breakage == "huge-num-examples":
        content["metrics"]["num-examples"] = 10**18
    elif breakage == "other-partition":
        content["metrics"]["partition-id"] = 1
    elif breakage == "nan-partition":
        content["metrics"]["partition-id"] = float("nan")
    elif breakage == "wrong-shape":
        from flwr.app import ArrayRecord

        content["scores"] = ArrayRecord({"saliency": Array(np.ones(n + 1, np.float32))})
    channel = Channel(FakeGrid([bad, saliency_reply(2, 1, s1, 30)]), 1.0)
    masks = strategy.make_mask(channel, {0: 1, 1: 2}, state)
    assert len(channel.failures) == 1 and channel.failures[0]["node_id"] == 1
    assert reason in channel.failures[0]["reason"], channel.failures[0]["reason"]
    expected = sparse.topk_mask(sparse.split_flat(torch.from_numpy(s1), strategy.layout, strategy.layout.maskable),
                                0.2)
    assert all(torch.equal(masks[k], expected[k]) for k in expected)  # node 2's scores alone


def install_reply(node: int, partition: int, fingerprint):
    return reply_to(RecordDict({"config": ConfigRecord({"fingerprint": fingerprint}),
                                "metrics": MetricRecord({"partition-id": partition})}), node, "query.install_mask")


def test_install_replies_are_validated_and_only_confirmed_nodes_hold_the_mask(task_identity):
    strategy, _ = with_random_mask()
    fp = strategy.fingerprint
    no_config = install_reply(2, 2, fp)
    del no_config.content["config"]
    wrong_type = install_reply(3, 3, fp)
    wrong_type.content["config"]["fingerprint"] = 7
    other_mask = install_reply(4, 4, "0123456789abcdef")
    channel = Channel(FakeGrid([install_reply(1, 1, fp), no_config, wrong_type, other_mask]), 1.0)
    strategy.install(channel, {1: 1, 2: 2, 3: 3, 4: 4})
    assert strategy.holders == {1}
    reasons = {f["node_id"]: f["reason"] for f in channel.failures}
    assert "lacks the record 'config'" in reasons[2] and "must be a string" in reasons[3]
    assert "installed mask 0123456789abcdef" in reasons[4]


def test_a_node_reporting_a_missing_mask_gets_it_again_before_the_next_round(task_identity):
    strategy, state = with_random_mask()
    fp = strategy.fingerprint
    strategy.holders = {1, 2}
    sent = []

    class RecordingGrid(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            sent.extend(messages)
            return [install_reply(m.metadata.dst_node_id, m.metadata.dst_node_id, fp) for m in messages]

    channel = Channel(RecordingGrid(), 1.0)
    strategy.setup(channel, {1: 1, 2: 2}, state, 2)
    assert sent == []  # both hold it: nothing to send
    strategy.note_client_errors({2: "ClientAppException: MaskMissing: no installed mask matches: ... mask none",
                                 1: "some other error"})
    strategy.setup(channel, {1: 1, 2: 2, 3: 3}, state, 3)  # node 3 joined after discovery
    assert sorted(m.metadata.dst_node_id for m in sent) == [2, 3]
    assert all(m.metadata.message_type == "query.install_mask" for m in sent)
    assert strategy.holders == {1, 2, 3}


def test_a_superlink_error_reply_is_recorded_against_the_node_it_was_for(task_identity):
    """A node that stopped heartbeating gets an error reply from the SuperLink itself (src node id 1): the failure
    belongs to the node the instruction went to, and that node is not also reported as silent."""
    from flwr.app import Error, Message
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    class SuperLinkGrid(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            for i, m in enumerate(messages):  # what the grids do when they push a message
                m.metadata.__dict__["_message_id"] = f"instruction-{i}"
            dead = create_message_error_unavailable_res_message(messages[0].metadata, "node_unavail")
            alive = Message(RecordDict(), reply_to=messages[1])
            assert dead.metadata.src_node_id != messages[0].metadata.dst_node_id and isinstance(dead.error, Error)
            return [dead, alive]

    channel = Channel(SuperLinkGrid(), 1.0)
    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (7, 8)]
    ok = channel.send(sent)
    assert len(ok) == 1 and ok[0].metadata.src_node_id == 8
    assert [(f["node_id"], "Node Unavailable" in f["reason"]) for f in channel.failures] == [(7, True)]
    assert 7 in channel.client_errors
