"""Strategies called directly, as Flower's `Strategy.start` calls them, with a fake grid and fake client replies:
discovery, aggregation, and every kind of bad reply."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedsparse import sparse, transport
from fedsparse.config import resolve
from fedsparse.models import build_model, maskable_names
from fedsparse.replies import NodeInfo
from server.strategies import STRATEGIES
from server.strategies.nodes import Failures, sort_replies
from tests.conftest import reply_to
from tests.faults import TRAIN_FAULTS, corrupt_reply


def info_reply(node: int, partition: int, examples: int = 100):
    return reply_to(RecordDict({"metrics": MetricRecord({"partition-id": partition, "num-examples": examples})}),
                    node, "query.info")


def install_reply(node: int, partition: int, fingerprint):
    return reply_to(RecordDict({"config": ConfigRecord({"fingerprint": fingerprint}),
                                "metrics": MetricRecord({"partition-id": partition})}), node, "query.install_mask")


class FakeGrid:
    """Connected nodes answering as honest clients do: query.info with partition = node id and 100 examples, and
    query.install_mask with the fingerprint they were sent; `answer(messages)` answers every other exchange."""

    def __init__(self, nodes=(1, 2, 3, 4), answer=None):
        self.nodes = list(nodes)
        self.answer = answer
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent += messages
        out = []
        for m in messages:
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            if kind == "query.info":
                out.append(info_reply(node, node))
            elif kind == "query.install_mask":
                out.append(install_reply(node, node, m.content["config"]["fingerprint"]))
        others = [m for m in messages if m.metadata.message_type not in ("query.info", "query.install_mask")]
        if others and self.answer is not None:
            out += self.answer(others)
        return out


def make_strategy(name: str, nodes=(1, 2, 3, 4), **overrides):
    """A strategy on the digits cnn (partitions 0..4; node n holds partition n, 100 examples) whose round 1 is
    configured through `configure_train`; returns it and the global model that round sends."""
    cfg = resolve({"strategy": name, "dataset": "digits", "num-clients": 5, "min-clients": 1, **overrides})
    model = build_model("cnn", (1, 16, 16), 10, seed=0)
    strategy = STRATEGIES[name].from_config(cfg, maskable_names(model))
    grid = FakeGrid(nodes)
    messages = list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(nodes)
    return strategy, strategy.plans[1].global_state


def reasons(strategy) -> str:
    return " ".join(f["reason"] for f in strategy.failures.records)


def client_reply(strategy, state, node_id: int, n: int, scale: float, dtype: str = "float32"):
    """What an honest client whose trained model is `scale` x the global one returns to round 1: its update."""
    values, dense = sparse.gather({k: v * (scale - 1) for k, v in state.items()}, strategy.layout, strategy.masks)
    content = RecordDict({
        "arrays": transport.make_payload(values, dense, dtype),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, "partition-id": node_id}),
        "config": ConfigRecord({"mask-fingerprint": strategy.fingerprint, "server-round": 1}),
    })
    return reply_to(content, node_id)


def aggregate(strategy, replies, server_round=1):
    """aggregate_train's (state dict or None, metrics dict)."""
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return (None if arrays is None else arrays.to_torch_state_dict()), dict(metrics)


def test_fedavg_is_the_example_weighted_mean(task_identity):
    strategy, state = make_strategy("fedavg", nodes=(1, 2, 3))
    replies = [client_reply(strategy, state, 1, 10, 1.0), client_reply(strategy, state, 2, 30, 2.0),
               client_reply(strategy, state, 3, 60, -1.0)]
    new, metrics = aggregate(strategy, replies)
    expected_scale = (10 * 1.0 + 30 * 2.0 + 60 * -1.0) / 100
    for k, v in state.items():
        torch.testing.assert_close(new[k], v * expected_scale, rtol=1e-5, atol=1e-6)
    assert metrics["accepted"] == 3 and metrics["sent"] == 3 and strategy.failures.records == []
    assert metrics["train_loss"] == 1.0 and 1 not in strategy.plans  # the round's plan is consumed


def test_configure_train_discovers_samples_and_sends_the_train_config(task_identity):
    """query.info goes to every node once; the round's partitions are the seeded sample; each train message holds
    the model payload and the config: server-round, lr decayed by lr-decay**(round-1), value-dtype, fingerprint,
    then the caller's entries (which cannot override fedsparse's)."""
    cfg = resolve({"strategy": "fedavg", "dataset": "digits", "num-clients": 5, "min-clients": 1,
                   "fraction-train": 0.4, "lr": 0.1, "lr-decay": 0.5, "seed": 3})
    model = build_model("cnn", (1, 16, 16), 10, seed=0)
    strategy = STRATEGIES["fedavg"].from_config(cfg, maskable_names(model))
    grid = FakeGrid((0, 1, 2, 3, 4))
    arrays = ArrayRecord(model.state_dict())
    first = list(strategy.configure_train(1, arrays, ConfigRecord({"task": "usps", "lr": 9.0}), grid))
    third = list(strategy.configure_train(3, arrays, ConfigRecord(), grid))
    assert [m.metadata.message_type for m in grid.sent].count("query.info") == 5  # discovery once
    rng = np.random.default_rng([3, 1])
    assert sorted(m.metadata.dst_node_id for m in first) == sorted(int(i) for i in rng.choice(5, 2, replace=False))
    config = first[0].content["config"]
    assert dict(config) == {"server-round": 1, "lr": 0.1, "value-dtype": "float32",
                            "mask-fingerprint": sparse.NO_MASK, "task": "usps"}
    assert third[0].content["config"]["lr"] == 0.1 * 0.5**2 and "task" not in third[0].content["config"]
    sent = torch.from_numpy(first[0].content["arrays"]["dense"].numpy())
    assert torch.equal(sent, sparse.flatten(model.state_dict(), strategy.layout.maskable + strategy.layout.dense))
    with pytest.raises(ValueError, match="never prepared"):
        strategy.aggregate_train(2, [])


def test_a_missing_reply_is_recorded_and_the_round_goes_on(task_identity):
    strategy, state = make_strategy("fedavg", nodes=(1, 2))
    new, metrics = aggregate(strategy, [client_reply(strategy, state, 1, 10, 2.0)])
    assert metrics["accepted"] == 1 and metrics["sent"] == 2
    assert [(f["node_id"], f["message"]) for f in strategy.failures.records] == [(2, "train")]
    assert "no reply within round-timeout" in reasons(strategy)
    for k, v in state.items():
        torch.testing.assert_close(new[k], v * 2.0, rtol=1e-5, atol=1e-6)


def with_random_mask(dtype="float16", nodes=(1, 2), **overrides):
    """A random-mask strategy whose round 1 was configured: the mask made and installed on `nodes`."""
    return make_strategy("random", nodes=nodes, **{"value-dtype": dtype, "sparsity": 0.9, **overrides})


def test_sparse_aggregation_stays_on_the_mask(task_identity):
    """Checked against the unmasked model, not against what `scatter` writes: configure_train must prune the global
    model (a client's trained model is `scale` x the pruned one), the masked values and the dense tensors both move
    by the example-weighted mean (5 x 2 + 15 x 4) / 20 = 3.5, and only the mask's share travels."""
    original = build_model("cnn", (1, 16, 16), 10, seed=0).state_dict()
    strategy, state = with_random_mask()
    masks = strategy.masks
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round(0.1 * strategy.layout.num_maskable)
    assert strategy.holders == {1, 2}  # the install went out and both confirmed
    for k in strategy.layout.maskable:
        assert torch.equal(state[k], torch.where(masks[k], original[k], torch.zeros(())))
    replies = [client_reply(strategy, state, 1, 5, 2.0, "float16"), client_reply(strategy, state, 2, 15, 4.0,
                                                                                   "float16")]
    assert replies[0].content["arrays"]["values"].numpy().size == kept
    new, metrics = aggregate(strategy, replies)
    assert metrics["logical_up"] == metrics["logical_down"] == 2 * 2 * (kept + strategy.layout.num_dense)
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
    new, metrics = aggregate(strategy, [good, bad])
    assert metrics["accepted"] == 1
    failures = strategy.failures.records
    assert len(failures) == 1 and failures[0]["node_id"] == 2
    assert "rejected reply" in failures[0]["reason"]
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
    strategy, state = make_strategy("fedavg", nodes=(2,))
    bad = client_reply(strategy, state, 2, 10, 1.5)
    bad.content["metrics"][field] = value
    new, _ = aggregate(strategy, [bad])
    failure = strategy.failures.records[0]["reason"]
    assert new is None and field in failure and reason in failure


def test_a_reply_from_an_undiscovered_node_is_rejected(task_identity):
    strategy, state = make_strategy("fedavg", nodes=(1,))
    stranger = client_reply(strategy, state, 9, 10, 1.5)
    assert aggregate(strategy, [stranger])[0] is None
    assert [(f["node_id"], "never discovered" in f["reason"]) for f in strategy.failures.records] == [
        (1, False), (9, True)]  # node 1 never answered; node 9 was never discovered


def test_foreign_mask_and_wrong_example_count_are_rejected(task_identity):
    strategy, state = with_random_mask(nodes=(1, 2, 3))
    foreign = client_reply(strategy, state, 1, 10, 1.0, "float16")
    foreign.content["config"]["mask-fingerprint"] = "deadbeefdeadbeef"
    negative = client_reply(strategy, state, 2, 10, 1.0, "float16")
    negative.content["metrics"]["num-examples"] = -4
    inf = client_reply(strategy, state, 3, 10, 1.0, "float16")
    inf.content["arrays"]["dense"] = Array(np.full(strategy.layout.num_dense, np.inf, dtype=np.float16))
    new, metrics = aggregate(strategy, [foreign, negative, inf])
    assert new is None and metrics["accepted"] == 0  # the runner then fails the run, keeping the checkpoint
    text = reasons(strategy)
    assert "fingerprint" in text and "num-examples" in text and "NaN or Inf" in text


def test_an_update_far_outside_the_rounds_norms_is_rejected_and_the_bound_is_configurable(task_identity):
    def run(ratio):
        strategy, state = make_strategy("fedavg", nodes=(1, 2, 3), **{"max-update-norm-ratio": ratio})
        replies = [client_reply(strategy, state, 1, 10, 1.5), client_reply(strategy, state, 2, 10, 0.5),
                   client_reply(strategy, state, 3, 10, 1.0 + 30)]  # update norms 0.5, 0.5, 30 (x |state|)
        new, metrics = aggregate(strategy, replies)
        return state, new, metrics, strategy.failures.records

    state, new, metrics, failures = run(10.0)
    assert metrics["accepted"] == 2 and failures[0]["node_id"] == 3
    assert "exceeds 10 x the round's median norm" in failures[0]["reason"]
    for k, v in state.items():
        torch.testing.assert_close(new[k], v, rtol=1e-5, atol=1e-6)  # (+0.5 - 0.5) / 2
    assert run(100.0)[2]["accepted"] == 3 and run(0.0)[2]["accepted"] == 3  # above the bound; check off


def test_a_non_finite_aggregate_is_never_returned(task_identity):
    strategy, state = make_strategy("fedavg", nodes=(1, 2))
    strategy.plans[1].global_state = {k: torch.full_like(v, 3e38) for k, v in state.items()}
    big = strategy.plans[1].global_state
    replies = [client_reply(strategy, big, 1, 10, 2.0), client_reply(strategy, big, 2, 10, 2.0)]  # +3e38 each
    new, metrics = aggregate(strategy, replies)  # 3e38 + 3e38 overflows float32
    assert new is None and metrics["accepted"] == 0
    assert "not finite" in strategy.failures.records[-1]["reason"]


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
    strategy, state = make_strategy("fedavg", nodes=(0, 1, 2, 3, 4), aggregation=aggregation,
                                    **{"trim-fraction": 0.2, "max-update-norm-ratio": 0.0})
    replies = [client_reply(strategy, state, i, 10, s) for i, s in enumerate([2.0, 1.9, 2.0, 2.1, -7.0])]
    new, metrics = aggregate(strategy, replies)
    assert metrics["accepted"] == 5
    for k, v in state.items():
        torch.testing.assert_close(new[k], v * scale, rtol=1e-5, atol=1e-6)


def test_ssfl_mask_is_the_topk_of_the_weighted_mean_score(task_identity):
    strategy, state = ssfl_bound()
    n = strategy.layout.num_maskable
    rng = np.random.default_rng(0)
    s1, s2 = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    strategy.roster.known = {1: NodeInfo(0, 10), 2: NodeInfo(1, 30)}
    grid = FakeGrid(answer=lambda _: [saliency_reply(1, 0, s1, 10), saliency_reply(2, 1, s2, 30)])
    masks = strategy.make_mask(grid, {0: 1, 1: 2}, state)
    assert [m.metadata.message_type for m in grid.sent] == ["query.saliency"] * 2
    mean = torch.from_numpy((10 * s1.astype(np.float64) + 30 * s2) / 40).float()
    expected = sparse.topk_mask(sparse.split_flat(mean, strategy.layout, strategy.layout.maskable), 0.2)
    assert all(torch.equal(masks[k], expected[k]) for k in expected)
    assert abs(sparse.density_of(masks) - 0.2) < 1e-5


def bound(name: str, **overrides):
    """A strategy bound to the digits cnn (partitions 0..2) before any exchange: no node known, no mask; and the
    model."""
    cfg = resolve({"strategy": name, "dataset": "digits", "num-clients": 3, **overrides})
    model = build_model("cnn", (1, 16, 16), 10, seed=0)
    strategy = STRATEGIES[name].from_config(cfg, maskable_names(model))
    state = model.state_dict()
    strategy.bind(ArrayRecord(state))
    return strategy, state


def ssfl_bound(sparsity=0.8):
    """An SSFL strategy bound to the digits cnn, before any exchange; and that model."""
    return bound("ssfl", sparsity=sparsity)


def saliency_reply(node: int, partition: int, scores: np.ndarray, examples: int):
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
    strategy, state = ssfl_bound()
    n = strategy.layout.num_maskable
    s1 = np.random.default_rng(1).random(n).astype(np.float32)
    strategy.roster.known = {1: NodeInfo(0, 10), 2: NodeInfo(1, 30)}
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
        content["scores"] = ArrayRecord({"saliency": Array(np.ones(n + 1, np.float32))})
    masks = strategy.make_mask(FakeGrid(answer=lambda _: [bad, saliency_reply(2, 1, s1, 30)]), {0: 1, 1: 2}, state)
    failures = strategy.failures.records
    assert len(failures) == 1 and failures[0]["node_id"] == 1
    assert reason in failures[0]["reason"], failures[0]["reason"]
    expected = sparse.topk_mask(sparse.split_flat(torch.from_numpy(s1), strategy.layout, strategy.layout.maskable),
                                0.2)
    assert all(torch.equal(masks[k], expected[k]) for k in expected)  # node 2's scores alone


def test_install_replies_are_validated_and_only_confirmed_nodes_hold_the_mask(task_identity):
    strategy, _ = with_random_mask()
    fp = strategy.fingerprint
    no_config = install_reply(2, 2, fp)
    del no_config.content["config"]
    wrong_type = install_reply(3, 3, fp)
    wrong_type.content["config"]["fingerprint"] = 7
    other_mask = install_reply(4, 4, "0123456789abcdef")
    strategy.roster.known.update({n: NodeInfo(n, 100) for n in (3, 4)})
    strategy.holders = set()

    class Installs(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            return [install_reply(1, 1, fp), no_config, wrong_type, other_mask]

    strategy.install(Installs(), {1: 1, 2: 2, 3: 3, 4: 4})
    assert strategy.holders == {1}
    by_node = {f["node_id"]: f["reason"] for f in strategy.failures.records}
    assert "lacks the record 'config'" in by_node[2] and "must be a string" in by_node[3]
    assert "installed mask 0123456789abcdef" in by_node[4]


def test_a_node_reporting_a_missing_mask_gets_it_again_before_the_next_round(task_identity):
    """Round 1 installs the mask on nodes 1 and 2; node 2 answers its train message with the client's MaskMissing
    error; before round 2 the mask goes again to node 2 and to node 3, which joined after discovery (and is
    discovered first), and to no one else."""
    strategy, state = with_random_mask(nodes=(1, 2))
    messages = strategy.plans[1].messages
    lost = Message(Error(0, "ClientAppException: MaskMissing: no installed mask matches: ... mask none"),
                   reply_to=messages[[m.metadata.dst_node_id for m in messages].index(2)])
    aggregate(strategy, [client_reply(strategy, state, 1, 10, 2.0, "float16"), lost])
    assert strategy.holders == {1}
    grid = FakeGrid((1, 2, 3))
    strategy.configure_train(2, ArrayRecord(state), ConfigRecord(), grid)
    one_off = [(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent]
    assert one_off == [("query.info", 3), ("query.install_mask", 2), ("query.install_mask", 3)]
    assert strategy.holders == {1, 2, 3}


def test_a_superlink_error_reply_is_recorded_against_the_node_it_was_for(task_identity):
    """A node that stopped heartbeating gets an error reply from the SuperLink itself (src node id 1): the failure
    belongs to the node the instruction went to, and that node is not also reported as silent."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (7, 8)]
    for i, m in enumerate(sent):  # what the grids do when they push a message
        m.metadata.__dict__["_message_id"] = f"instruction-{i}"
    dead = create_message_error_unavailable_res_message(sent[0].metadata, "node_unavail")
    alive = Message(RecordDict(), reply_to=sent[1])
    assert dead.metadata.src_node_id != sent[0].metadata.dst_node_id and isinstance(dead.error, Error)
    failures = Failures()
    got = sort_replies(sent, [dead, alive], failures, 1.0)
    assert len(got.replies) == 1 and got.replies[0].metadata.src_node_id == 8
    assert [(f["node_id"], "Node Unavailable" in f["reason"]) for f in failures.records] == [(7, True)]
    assert 7 in got.errors


def test_counting_grid_counts_every_message_by_type_and_direction(task_identity):
    """Down: every instruction's records; up: every reply with content, under its instruction's type; an error
    reply counts nothing; query.* is one-off, the rest round traffic; an empty send reaches no grid."""
    from server.grid import Bytes, CountingGrid

    payload = ArrayRecord({"w": Array(np.zeros(10, np.float32))})  # 128-byte npy header + 40 B + key "w"
    config = ConfigRecord({"server-round": 1})  # key + 8 B

    class Answering(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            self.sent += messages
            return [Message(RecordDict({"arrays": payload}), reply_to=messages[0]),
                    Message(Error(0, "boom"), reply_to=messages[1])]

    inner = Answering((1, 2))
    grid = CountingGrid(inner)
    train = [Message(RecordDict({"arrays": payload, "config": config}), dst_node_id=n, message_type="train")
             for n in (1, 2)]
    replies = grid.send_and_receive(train, timeout=1.0)
    assert len(replies) == 2 and len(inner.sent) == 2
    one_array, one_config = 128 + 40 + 1, len("server-round") + 8
    assert grid.by_type == {"train": Bytes(2 * (one_array + one_config), one_array)}
    info = [Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in (1, 2)]
    grid.send_and_receive(info)
    assert grid.one_off() == Bytes(0, one_array) and grid.rounds() == Bytes(2 * (one_array + one_config), one_array)
    assert grid.send_and_receive([]) == [] and len(inner.sent) == 4
    with pytest.raises(TypeError, match="twice"):
        CountingGrid(grid)
