"""Merging as the aggregation of ordinary rounds (`ties`, `dare`): the strategies called as Flower calls them, on a
hand-built model and hand-computed merges, their config keys, and one real Ray simulation."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsparse import sparse, transport
from fedsparse.config import ConfigError, resolve
from fedsparse.merging.merge import MergeSettings, merge_task_vectors
from fedsparse.models import build_model, maskable_names
from fedsparse.results import read_rounds
from server.strategies import STRATEGIES
from tests.conftest import LEARNING, fedsparse_run, reply_to, summary
from tests.test_strategies import FakeGrid

# A 6-float model with an integer buffer: small enough to merge by hand.
GLOBAL = {"w": torch.tensor([[0.1, 0.2], [0.3, 0.4]]), "b": torch.tensor([0.5, -0.5]),
          "count": torch.tensor(7, dtype=torch.int64)}
# Three clients' updates (their model minus GLOBAL). No ties in |value| within an update.
UPDATES = [
    {"w": torch.tensor([[1.0, -2.0], [3.0, 0.5]]), "b": torch.tensor([-4.0, 0.1]), "count": torch.tensor(1.0)},
    {"w": torch.tensor([[2.0, 1.5], [-1.0, 0.2]]), "b": torch.tensor([3.0, -0.3]), "count": torch.tensor(2.0)},
    {"w": torch.tensor([[-0.5, 2.5], [-1.5, 0.1]]), "b": torch.tensor([-1.0, 0.4]), "count": torch.tensor(3.0)},
]
EXAMPLES = [10, 30, 60]


def small_strategy(name: str, nodes=(0, 1, 2), server_round: int = 1, **overrides):
    """Strategy `name` from a resolved config on GLOBAL (maskable: w), with round `server_round` configured on a fake
    grid of `nodes` (node n holds partition n, 100 examples)."""
    cfg = resolve({"strategy": name, "dataset": "digits", "num-clients": len(nodes), "min-clients": 1, **overrides})
    strategy = STRATEGIES[name].from_config(cfg, ["w"])
    list(strategy.configure_train(server_round, ArrayRecord(dict(GLOBAL)), ConfigRecord(), FakeGrid(nodes)))
    return strategy


def update_reply(strategy, node_id: int, examples: int, update: dict, server_round: int = 1):
    """An honest client's train reply carrying `update` (a state dict of the model's keys)."""
    values, dense = sparse.gather(update, strategy.layout, None)
    content = RecordDict({
        "arrays": transport.make_payload(values, dense, "float32"),
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, "partition-id": node_id}),
        "config": ConfigRecord({"mask-fingerprint": strategy.fingerprint, "server-round": server_round}),
    })
    return reply_to(content, node_id)


def aggregate(strategy, replies, server_round: int = 1) -> dict:
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    assert arrays is not None, dict(metrics)
    return arrays.to_torch_state_dict()


def three_replies(strategy, server_round: int = 1):
    return [update_reply(strategy, node, n, u, server_round)
            for node, (n, u) in enumerate(zip(EXAMPLES, UPDATES, strict=True))]


def test_ties_with_one_client_density_1_lambda_1_gives_that_clients_model(task_identity):
    """On the digits cnn: the aggregate of one client's update is exactly global + update."""
    cfg = resolve({"strategy": "ties", "dataset": "digits", "num-clients": 1, "aggregate.density": 1.0})
    model = build_model("cnn", (1, 16, 16), 10, seed=0)
    strategy = STRATEGIES["ties"].from_config(cfg, maskable_names(model))
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), FakeGrid((0,))))
    state = strategy.plans[1].global_state
    generator = torch.Generator().manual_seed(3)
    update = {k: torch.randn(v.shape, generator=generator) * 0.01 for k, v in state.items()}
    new = aggregate(strategy, [update_reply(strategy, 0, 50, update)])
    for key, value in state.items():
        assert torch.equal(new[key], value + update[key]), key


def test_ties_on_three_clients_is_the_hand_computed_merge(task_identity):
    """Density 0.5 keeps 3 of each update's 6 float entries: A w01 w10 b0, B w00 w01 b0, C w01 w10 b0. Elected signs
    (sum of the trimmed updates): w00 +, w01 + (-2 + 1.5 + 2.5), w10 + (3 - 1.5), b0 - (-4 + 3 - 1). Disjoint mean:
    w00 = 2 (B), w01 = (1.5 + 2.5) / 2 (A disagrees), w10 = 3 (C disagrees), b0 = (-4 - 1) / 2 (B disagrees), the
    rest 0. lambda 0.5 halves it. The integer buffer moves by FedAvg's weighted mean (1x10 + 2x30 + 3x60) / 100."""
    strategy = small_strategy("ties", **{"aggregate.density": 0.5, "aggregate.lambda": 0.5})
    new = aggregate(strategy, three_replies(strategy))
    merged = {"w": torch.tensor([[2.0, 2.0], [3.0, 0.0]]), "b": torch.tensor([-2.5, 0.0])}
    torch.testing.assert_close(new["w"], GLOBAL["w"] + 0.5 * merged["w"], rtol=0, atol=1e-7)
    torch.testing.assert_close(new["b"], GLOBAL["b"] + 0.5 * merged["b"], rtol=0, atol=1e-7)
    assert float(new["count"]) == pytest.approx(7 + 2.5)
    # the same as merge_task_vectors on the float entries (unweighted), scaled by lambda
    settings = MergeSettings(sparsify="magnitude", density=0.5, sign_consensus="ties", aggregate="disjoint_mean")
    direct = merge_task_vectors([{"w": u["w"], "b": u["b"]} for u in UPDATES], settings)
    for key in ("w", "b"):
        torch.testing.assert_close(new[key], GLOBAL[key] + 0.5 * direct[key], rtol=0, atol=1e-7)
        torch.testing.assert_close(direct[key], merged[key])


def test_dare_with_drop_0_is_fedavgs_weighted_mean(task_identity):
    fedavg = small_strategy("fedavg")
    dare = small_strategy("dare", **{"aggregate.drop": 0.0})
    expected = aggregate(fedavg, three_replies(fedavg))
    got = aggregate(dare, three_replies(dare))
    for key in GLOBAL:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    weighted = sum(n * u["w"] for n, u in zip(EXAMPLES, UPDATES, strict=True)) / sum(EXAMPLES)
    torch.testing.assert_close(got["w"], GLOBAL["w"] + weighted, rtol=1e-6, atol=1e-7)


def test_dare_drops_and_rescales_reproducibly_per_round(task_identity):
    """One client, drop 0.5: every float entry moves by 0 or 2 x the update; a fresh strategy (a resumed server)
    draws the same drops in the same round, another round draws others; the integer buffer is never dropped."""
    update = {"w": torch.arange(1.0, 5.0).reshape(2, 2), "b": torch.tensor([5.0, 6.0]), "count": torch.tensor(1.0)}

    def run(server_round: int) -> dict:
        strategy = small_strategy("dare", nodes=(0,), server_round=server_round, seed=4)
        new = aggregate(strategy, [update_reply(strategy, 0, 10, update, server_round)], server_round)
        return {key: new[key] - GLOBAL[key] for key in GLOBAL}

    moves = {server_round: run(server_round) for server_round in (1, 2, 3)}
    kept = []
    for key in ("w", "b"):
        step = moves[1][key]
        is_zero = step.abs() < 1e-6
        torch.testing.assert_close(torch.where(is_zero, 2 * update[key], step), 2 * update[key])
        kept.append(~is_zero)
    assert float(moves[1]["count"]) == pytest.approx(1.0)
    again = run(1)
    assert all(torch.equal(again[key], moves[1][key]) for key in GLOBAL)
    assert any(not torch.equal(moves[r][key], moves[1][key]) for r in (2, 3) for key in ("w", "b"))


def test_merge_aggregation_keys_are_checked_by_name():
    with pytest.raises(ConfigError, match="'aggregate.densty'"):
        resolve({"strategy": "ties", "aggregate.densty": 0.5})
    for key, bad in (("aggregate.density", 0.0), ("aggregate.density", 1.5), ("aggregate.drop", 1.0),
                     ("aggregate.drop", -0.1), ("aggregate.lambda", 0.0)):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            resolve({"strategy": "ties" if key != "aggregate.drop" else "dare", key: bad})
    # a key the chosen strategy does not read, set off its default, is refused with the strategy that reads it
    with pytest.raises(ConfigError, match=r"'aggregate.drop'.*strategies that use it: dare"):
        resolve({"strategy": "ties", "aggregate.drop": 0.1})
    with pytest.raises(ConfigError, match=r"'aggregate.density'.*strategies that use it: ties"):
        resolve({"strategy": "dare", "aggregate.density": 0.5})
    with pytest.raises(ConfigError, match="'aggregate.lambda'"):
        resolve({"strategy": "fedavg", "aggregate.lambda": 0.5})
    cfg = resolve({"strategy": "dare", "aggregate.drop": 0.3, "aggregate.lambda": 0.8})
    strategy = STRATEGIES["dare"].from_config(cfg, ["w"])
    assert strategy.merge_settings().density == pytest.approx(0.7) and strategy.scale == 0.8
    with pytest.raises(ValueError, match="aggregation must be 'mean'"):
        STRATEGIES["ties"].from_config(resolve({"strategy": "ties", "aggregation": "median"}), ["w"])


@pytest.mark.slow
def test_ties_and_dare_run_as_a_ray_simulation(tmp_path):
    """`fedsparse run` with each strategy: 2 rounds on digits, 5 clients; the dense float32 model goes down (logical
    bytes: 2 rounds x 5 clients x 4 bytes x the model's size, as FedAvg) and comes back as large from each reply
    accepted. (Not asserted: no failures; on a machine short of memory Ray kills a client now and then.)"""
    model_size = sum(p.numel() for p in build_model("cnn", (1, 16, 16), 10, seed=0).state_dict().values())
    for name in ("ties", "dare"):
        out = tmp_path / name
        fedsparse_run(out, *LEARNING, f"strategy={name}", "num-clients=5", "num-rounds=2", "seed=1")
        result = summary(out)
        assert result["strategy"] == name and result["rounds"] == 2
        assert result["logical_down"] == 2 * 5 * 4 * model_size
        accepted = sum(row["clients"] for row in read_rounds(out / "rounds.csv"))  # clients: the accepted replies
        assert result["logical_up"] == accepted * 4 * model_size > 0
        assert result["final_accuracy"] > 0.3, result  # chance is 0.1; ties seed 1 reached 0.88
