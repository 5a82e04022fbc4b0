"""Discovery on demand (`server.strategies.nodes.Roster.locate`): a round asks only the nodes of the partitions it
samples, with 1,000 cheap stub nodes (no training), and the sampling survives a restart of the server.

The stub grid gives its nodes random 64-bit ids, as Flower does, and holds partitions in an order unrelated to
the sorted ids; with `hint=True` it exposes Flower's in-memory link state shape (`grid.state.get_node_info()` in
registration order = partition order), as the simulation engine's grid does.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedsparse.config import ConfigError, resolve
from fedsparse.models import build_model, maskable_names
from server.strategies import STRATEGIES
from server.strategies.nodes import registration_order, sample_partitions

NUM_NODES = 1000
PER_ROUND = 10


class StubNodes:
    """`num_nodes` nodes with random ids; node `ids[p]` holds partition p and answers query.info with it (100
    examples), unless listed in `failing` (an error reply) or `liars` (claims another partition). Records every
    message it receives in `asked` as (node id, message type)."""

    def __init__(self, num_nodes: int = NUM_NODES, seed: int = 0, hint: bool = True) -> None:
        rng = np.random.default_rng(seed)
        self.ids = [int(i) for i in rng.choice(2**63 - 2, size=num_nodes, replace=False) + 1]
        self.partition_of = {node: p for p, node in enumerate(self.ids)}
        self.failing: set[int] = set()
        self.liars: dict[int, int] = {}
        self.asked: list[tuple[int, str]] = []
        if hint:  # the shape of flwr's InMemoryGrid: state.get_node_info() lists nodes in registration order
            self.state = SimpleNamespace(get_node_info=lambda: [SimpleNamespace(node_id=n) for n in self.ids])

    def get_node_ids(self) -> set[int]:
        return set(self.partition_of)  # a set, as Flower's link state returns: no order to rely on

    def info_asked(self) -> list[int]:
        return [node for node, kind in self.asked if kind == "query.info"]

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            node = int(message.metadata.dst_node_id)
            kind = message.metadata.message_type
            self.asked.append((node, kind))
            if node not in self.partition_of or kind != "query.info":
                continue
            if node in self.failing:
                replies.append(Message(Error(code=0, reason="RuntimeError: disk full"), reply_to=message))
                continue
            partition = self.liars.get(node, self.partition_of[node])
            content = RecordDict({"metrics": MetricRecord({"partition-id": partition, "num-examples": 100})})
            replies.append(Message(content, reply_to=message))
        return replies


def fedavg(**overrides):
    """FedAvg from a config of 1,000 clients, 10 per round (discovery auto: on demand)."""
    cfg = resolve({"strategy": "fedavg", "dataset": "digits", "model": "mlp", "num-clients": NUM_NODES,
                   "min-clients": 1, "fraction-train": PER_ROUND / NUM_NODES, "seed": 7, **overrides})
    model = build_model("mlp", (1, 16, 16), 10, seed=0)
    return STRATEGIES["fedavg"].from_config(cfg, maskable_names(model)), ArrayRecord(model.state_dict())


def trained(grid: StubNodes, messages) -> list[int]:
    """The partitions a round's train messages go to."""
    return sorted(grid.partition_of[int(m.metadata.dst_node_id)] for m in messages)


def test_round_1_asks_only_the_sampled_nodes(task_identity):
    strategy, arrays = fedavg()
    grid = StubNodes()
    assert strategy.discovery == "on-demand" and strategy.discover(grid) == {}  # nothing asked before round 1
    messages = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    sampled = sample_partitions(NUM_NODES, PER_ROUND / NUM_NODES, 7, 1)
    assert len(sampled) == PER_ROUND and trained(grid, messages) == sampled
    assert sorted(grid.info_asked()) == sorted(grid.ids[p] for p in sampled)
    assert strategy.failures.records == []
    before = len(grid.info_asked())
    strategy.configure_train(2, arrays, ConfigRecord(), grid)
    new = set(sample_partitions(NUM_NODES, PER_ROUND / NUM_NODES, 7, 2)) - set(sampled)
    assert len(grid.info_asked()) - before == len(new)  # only the partitions not located yet


def test_failed_nodes_are_recorded_and_not_searched_for(task_identity):
    """A sampled node whose query.info fails is dropped and recorded; the round trains the others and asks no one
    else (the node the simulation registered for a partition is its only holder)."""
    strategy, arrays = fedavg()
    grid = StubNodes()
    sampled = sample_partitions(NUM_NODES, PER_ROUND / NUM_NODES, 7, 1)
    grid.failing = {grid.ids[sampled[0]], grid.ids[sampled[3]]}
    messages = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    assert len(grid.info_asked()) == PER_ROUND
    assert trained(grid, messages) == [p for i, p in enumerate(sampled) if i not in (0, 3)]
    failed = sorted((f["node_id"], f["message"]) for f in strategy.failures.records)
    assert failed == sorted((n, "query.info") for n in grid.failing)
    assert all("disk full" in f["reason"] for f in strategy.failures.records)
    assert grid.failing <= strategy.roster.dropped


def test_a_wrong_hint_costs_queries_never_a_wrong_mapping(task_identity):
    """A hinted node that claims another partition is taken at its word; the partition it was thought to hold is
    then searched for among the nodes not asked yet; a claim on a partition a connected node holds is dropped."""
    strategy, arrays = fedavg()
    grid = StubNodes()
    sampled = sample_partitions(NUM_NODES, PER_ROUND / NUM_NODES, 7, 1)
    swapped = [p for p in range(NUM_NODES) if p not in sampled][:1]
    first, other = grid.ids[sampled[0]], grid.ids[swapped[0]]
    # the two nodes hold each other's partition: the hint (registration order) is wrong for both
    grid.partition_of[first], grid.partition_of[other] = swapped[0], sampled[0]
    messages = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    assert trained(grid, messages) == sampled
    assert strategy.roster.partitions()[sampled[0]] == other and strategy.failures.records == []
    asked = grid.info_asked()
    assert len(asked) == len(set(asked)) and other in asked[-strategy.discovery_batch:]  # stopped once found
    # a node that claims a partition a connected node holds is dropped, with the reason recorded
    liar = next(n for n in grid.ids if n not in set(asked))
    grid.liars[liar] = sampled[1]
    strategy.roster.ask(grid, [liar], set(grid.ids), NUM_NODES, 2**62, strategy.failures, 1.0)
    assert liar in strategy.roster.dropped and "already held by node" in strategy.failures.records[-1]["reason"]


def test_without_a_hint_nodes_are_asked_in_batches_until_found(task_identity):
    """A deployment's grid gives no hint: batches of not-yet-asked nodes until every sampled partition is found;
    no node is asked twice and the mapping is exact."""
    strategy, arrays = fedavg()
    grid = StubNodes(hint=False)
    messages = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    sampled = sample_partitions(NUM_NODES, PER_ROUND / NUM_NODES, 7, 1)
    assert trained(grid, messages) == sampled
    asked = grid.info_asked()
    assert len(asked) == len(set(asked)) and len(asked) % strategy.discovery_batch in (0, NUM_NODES % 64)
    last_batch = sorted(grid.partition_of)[len(asked) - strategy.discovery_batch:len(asked)]
    assert any(grid.partition_of[n] in sampled for n in last_batch)  # it stopped at the batch that found the last
    assert all(strategy.roster.known[n].partition_id == grid.partition_of[n] for n in strategy.roster.known)


def test_a_restarted_node_with_a_new_id_takes_over_its_partition(task_identity):
    strategy, arrays = fedavg()
    grid = StubNodes()
    strategy.configure_train(1, arrays, ConfigRecord(), grid)
    second = sample_partitions(NUM_NODES, PER_ROUND / NUM_NODES, 7, 2)
    gone = strategy.roster.partitions().get(second[0])
    if gone is None:  # make round 2's first partition one round 1 located
        gone = next(iter(strategy.roster.known))
        second = [strategy.roster.known[gone].partition_id]
    partition = strategy.roster.known[gone].partition_id
    del grid.partition_of[gone]
    grid.partition_of[12345] = partition  # back with a new id, not in the registration order
    found = strategy.locate(grid, [partition])
    assert found == {partition: 12345} and gone not in strategy.roster.known
    assert strategy.failures.records == []


def test_a_resumed_server_samples_the_same_partitions_and_asks_only_their_nodes(task_identity):
    """A server restarted before round 3 (a resumed run: in simulation every node has a new id) trains the same
    partitions as the uninterrupted one, asking only their nodes."""
    uninterrupted, arrays = fedavg()
    grid = StubNodes(seed=0)
    rounds = [trained(grid, uninterrupted.configure_train(r, arrays, ConfigRecord(), grid)) for r in (1, 2, 3)]
    resumed, _ = fedavg()
    new_grid = StubNodes(seed=1)  # the same partitions on nodes with other ids
    assert set(new_grid.ids).isdisjoint(grid.ids)
    assert trained(new_grid, resumed.configure_train(3, arrays, ConfigRecord(), new_grid)) == rounds[2]
    assert len(new_grid.info_asked()) == len(rounds[2])


def test_discovery_mode_from_the_config():
    model = build_model("mlp", (1, 16, 16), 10, seed=0)
    names = maskable_names(model)

    def mode(**overrides) -> str:
        cfg = resolve({"dataset": "digits", "model": "mlp", **overrides})
        return STRATEGIES[cfg["strategy"]].from_config(cfg, names).discovery

    assert mode(strategy="fedavg") == "on-demand" and mode(strategy="topk") == "on-demand"
    assert mode(strategy="ssfl") == "all" and mode(strategy="random") == "all"  # the mask goes to every client
    assert mode(strategy="fedavg", discovery="all") == "all"
    with pytest.raises(ConfigError, match="config key 'discovery'.*needs discovery=all"):
        mode(strategy="ssfl", discovery="on-demand")


def test_registration_order_is_partition_order_in_flowers_simulation_engine():
    """The hint's assumption, checked against Flower itself: the simulation engine's node registration (which
    gives the i-th node partition-id i) and the in-memory link state's node listing agree."""
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = _register_nodes(num_nodes=200, state_factory=factory)  # {node id: partition id}
    grid = SimpleNamespace(grid=SimpleNamespace(state=factory.state()))  # a wrapper around the in-memory grid
    order = registration_order(grid, 200)
    assert order is not None and [mapping[n] for n in order] == list(range(200))
    assert registration_order(grid, 201) is None and registration_order(SimpleNamespace(), 200) is None
