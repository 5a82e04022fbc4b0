"""Client state across a resume (`client.state`): the snapshot store (exact round trip, pruning, damaged files),
the restore rules (a fresh run forgets an older run's snapshots, a resumed run starts from the newest, a re-run
round rewinds to the state before it), and the real ClientApp with the top-k handler, whose error-feedback residual
makes a resumed client's reply bit-identical to an uninterrupted one's only if the state came back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import handlers
from client.client_app import build_app
from client.state import (
    STATE_MARKER,
    ClientStateError,
    ClientStateStore,
    answered_round,
    record_state,
    restore_state,
)
from fedsparse import sparse, transport
from fedsparse.config import resolve
from fedsparse.data import load_dataset
from fedsparse.models import build_model
from fedsparse.results import read_rounds
from tests.conftest import REPO, fedsparse_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def a_state(tag: float) -> RecordDict:
    """A node state with every record type and several dtypes; `tag` makes states of different rounds differ."""
    return RecordDict({
        "residual": ArrayRecord({"residual": Array(np.arange(5, dtype=np.float32) * tag),
                                 "bits": Array(np.array([1, 255, 7], dtype=np.uint8)),
                                 "index": Array(np.array([[3, -2]], dtype=np.int64))}),
        "info": ConfigRecord({"fingerprint": "ab12", "count": 3, "tag": tag, "flag": True, "names": ["a", "b"]}),
        "metrics": MetricRecord({"loss": 0.25 * tag, "seen": 7}),
    })


def assert_same_state(got: RecordDict, want: RecordDict) -> None:
    assert sorted(got.keys()) == sorted(want.keys())
    for key, record in want.items():
        assert type(got[key]) is type(record), key
        if isinstance(record, ArrayRecord):
            assert sorted(got[key].keys()) == sorted(record.keys()), key
            for name, array in record.items():
                a, b = got[key][name].numpy(), array.numpy()
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (key, name)
        else:
            assert dict(got[key].items()) == dict(record.items()), key


# --------------------------------------------------------------------------------------------- the store


def test_a_snapshot_loads_back_every_record_exactly(tmp_path):
    store = ClientStateStore(tmp_path / "node")
    state = a_state(1.5)
    store.save(4, state)
    assert store.rounds() == [4]
    assert_same_state(store.load(4), state)


def test_the_newest_snapshots_are_kept_and_discard_from_drops_later_rounds(tmp_path):
    store = ClientStateStore(tmp_path, keep=3)
    for server_round in (0, 1, 2, 5, 7):
        store.save(server_round, a_state(server_round))
    assert store.rounds() == [0, 2, 5, 7]  # round 0 always stays
    store.save(5, a_state(50.0))  # a slot is replaced, not duplicated
    assert store.rounds() == [0, 2, 5, 7]
    assert store.load(5)["info"]["tag"] == 50.0
    store.discard_from(5)
    assert store.rounds() == [0, 2]
    store.clear()
    assert store.rounds() == []


def test_a_missing_or_damaged_snapshot_is_an_error_naming_the_file(tmp_path):
    store = ClientStateStore(tmp_path)
    with pytest.raises(ClientStateError, match="round-00000003.state"):
        store.load(3)
    store.save(3, a_state(1.0))
    (tmp_path / "round-00000003.state").write_bytes(b"\xff\x00 not a record dict")
    with pytest.raises(ClientStateError, match="round-00000003.state"):
        store.load(3)


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        ClientStateStore(tmp_path, keep=0)
    with pytest.raises(ValueError, match="server_round"):
        ClientStateStore(tmp_path).save(-1, a_state(1.0))


def test_the_folder_is_per_partition_under_the_output_dir_unless_set(tmp_path):
    cfg = {"client-state-dir": "", "output-dir": str(tmp_path / "run")}
    assert ClientStateStore.for_node(cfg, 3).folder == tmp_path / "run" / "client-state" / "partition-3"
    cfg["client-state-dir"] = str(tmp_path / "elsewhere")
    assert ClientStateStore.for_node(cfg, 0).folder == tmp_path / "elsewhere" / "partition-0"


# --------------------------------------------------------------------------------------- restore / record


def answer_rounds(store: ClientStateStore, rounds: list[int]) -> RecordDict:
    """A node of a fresh run answering train `rounds` (its state tagged with the round each time)."""
    state = RecordDict()
    for server_round in rounds:
        restore_state(state, store, resume=False, train_round=server_round)
        state["residual"] = a_state(server_round)["residual"]
        record_state(state, store, train_round=server_round)
    return state


def test_a_fresh_run_forgets_the_snapshots_an_older_run_left(tmp_path):
    store = ClientStateStore(tmp_path)
    answer_rounds(store, [1, 2])
    state = RecordDict()
    restore_state(state, store, resume=False, train_round=1)
    assert list(state.keys()) == [STATE_MARKER] and answered_round(state) == 0
    assert store.rounds() == [0]  # the new run's own start


def test_a_resumed_run_starts_from_the_newest_snapshot(tmp_path):
    store = ClientStateStore(tmp_path)
    before = answer_rounds(store, [1, 2])
    state = RecordDict()  # the resumed run's Context.state
    restore_state(state, store, resume=True, train_round=None)  # e.g. query.info first
    assert_same_state(state, before)
    assert answered_round(state) == 2
    restore_state(state, store, resume=True, train_round=3)  # the next round: nothing to rewind
    assert_same_state(state, before)


def test_a_round_the_server_re_runs_starts_from_the_state_before_it(tmp_path):
    store = ClientStateStore(tmp_path)
    answer_rounds(store, [1, 2, 4])  # not sampled in round 3
    state = RecordDict()
    restore_state(state, store, resume=True, train_round=3)  # the server resumed from its round-2 checkpoint
    assert answered_round(state) == 2
    assert np.array_equal(state["residual"]["residual"].numpy(), a_state(2)["residual"]["residual"].numpy())
    assert store.rounds() == [0, 1, 2]  # round 4's snapshot belonged to the abandoned timeline


def test_what_a_query_installs_after_a_train_belongs_to_that_train_s_slot(tmp_path):
    store = ClientStateStore(tmp_path)
    state = answer_rounds(store, [1])
    restore_state(state, store, resume=False, train_round=None)
    state["mask"] = ArrayRecord({"bits": Array(np.array([9], dtype=np.uint8))})  # e.g. query.install_mask
    record_state(state, store, train_round=None)
    answer_rounds_state = RecordDict()
    restore_state(answer_rounds_state, store, resume=True, train_round=2)
    assert "mask" in answer_rounds_state and answered_round(answer_rounds_state) == 1


def test_a_server_starting_over_rewinds_the_node_to_its_first_state(tmp_path):
    """resume=true but the server has no checkpoint: round 1 again, after the older run's round 5."""
    store = ClientStateStore(tmp_path, keep=1)
    answer_rounds(store, [1, 2, 3, 4, 5])
    assert store.rounds() == [0, 5]
    state = RecordDict()
    restore_state(state, store, resume=True, train_round=1)
    assert list(state.keys()) == [STATE_MARKER] and answered_round(state) == 0
    assert store.rounds() == [0]


def test_a_rewind_with_no_earlier_snapshot_left_is_an_error(tmp_path):
    store = ClientStateStore(tmp_path, keep=1)
    answer_rounds(store, [1, 2, 3])
    store.discard_from(0)
    state = a_state(3.0)
    state[STATE_MARKER] = ConfigRecord({"round": 3})
    store.save(3, state)
    with pytest.raises(ClientStateError, match="no snapshot of a round before 2"):
        restore_state(RecordDict(), store, resume=True, train_round=2)


# ----------------------------------------------------------------- the real ClientApp with the top-k handler


def topk_cfg(out, **settings) -> dict:
    return resolve({"dataset": "digits", "model": "mlp", "num-clients": 3, "partitioner": "iid",
                    "strategy": "topk", "sparse.topk-density": 0.05, "output-dir": str(out), **settings})


def topk_message(cfg: dict, server_round: int) -> Message:
    """The round's train.topk message: a global model that differs from round to round, dense on the wire."""
    _, layout = handlers.model_and_layout(cfg)  # its model is the handlers' scratch copy: build a fresh one
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    net = build_model(cfg["model"], data.input_shape, data.num_classes, seed=0)
    gen = torch.Generator().manual_seed(server_round)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in net.state_dict().items()}
    values, dense = sparse.gather(state, layout, None)
    content = RecordDict({
        "arrays": transport.make_payload(values, dense, "float32"),
        "config": ConfigRecord({"server-round": server_round, "lr": 0.05, "value-dtype": "float32",
                                "mask-fingerprint": sparse.NO_MASK}),
    })
    return Message(content, dst_node_id=1, message_type="train.topk")


def node_context(cfg: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                   run_config=cfg)


def reply_bytes(app, cfg: dict, context: Context, server_round: int) -> bytes:
    reply = app(topk_message(cfg, server_round), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply.content["arrays"][transport.TOPK_KEY].data


def test_a_resumed_topk_client_replies_bit_identically(tmp_path, task_identity):
    """Rounds 1-4 uninterrupted vs rounds 1-3, then a new run (empty Context.state, resume=true) in which the
    server re-runs round 3 and goes on to 4. Without the snapshots (an empty folder) round 3 differs."""
    app = build_app()
    whole_cfg = topk_cfg(tmp_path / "whole")
    whole_context = node_context(whole_cfg)
    whole = [reply_bytes(app, whole_cfg, whole_context, r) for r in range(1, 5)]

    crashed_cfg = topk_cfg(tmp_path / "crashed")
    first_context = node_context(crashed_cfg)
    first = [reply_bytes(app, crashed_cfg, first_context, r) for r in range(1, 4)]
    assert first == whole[:3]
    resumed_cfg = topk_cfg(tmp_path / "crashed", resume=True)
    resumed_context = node_context(resumed_cfg)
    assert [reply_bytes(app, resumed_cfg, resumed_context, r) for r in (3, 4)] == whole[2:]

    forgetful_cfg = topk_cfg(tmp_path / "crashed", resume=True, **{"client-state-dir": str(tmp_path / "empty")})
    assert reply_bytes(app, forgetful_cfg, node_context(forgetful_cfg), 3) != whole[2]


def test_a_failed_handler_changes_no_snapshot(tmp_path, task_identity, monkeypatch):
    app = build_app()
    cfg = topk_cfg(tmp_path)
    context = node_context(cfg)
    reply_bytes(app, cfg, context, 1)
    store = ClientStateStore.for_node(cfg, 1)
    saved = store.load(1)

    def broken(content, state, cfg, partition_id):
        state["residual-garbage"] = ArrayRecord({"x": Array(np.zeros(1, dtype=np.float32))})
        raise RuntimeError("the handler failed")

    monkeypatch.setitem(handlers.HANDLERS, "train.topk", broken)
    with pytest.raises(RuntimeError, match="the handler failed"):  # Flower turns it into an error reply
        build_app()(topk_message(cfg, 2), context)
    assert store.rounds() == [0, 1]
    assert_same_state(store.load(1), saved)
    assert answered_round(context.state) == 1


# ------------------------------------------------------------------ end to end: fedsparse run, stop, resume

E2E = ("dataset=digits", "model=mlp", "num-clients=3", "partitioner=iid", "seed=7")


def run_side_by_side(*runs: tuple[Path, tuple[str, ...]], timeout: float = 600) -> None:
    """`fedsparse run --out OUT --set SETTINGS` for every (OUT, SETTINGS) at once, each its own Ray cluster with one
    CPU (most of a tiny run is Ray starting up, which overlaps well); fails naming the run that failed."""
    procs = [(out, subprocess.Popen([sys.executable, "-m", "fedsparse.cli", "run", "--ray-cpus", "1", "--out",
                                     str(out), "--set", *settings], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
             for out, settings in runs]
    for out, proc in procs:
        output, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"fedsparse run --out {out} failed ({proc.returncode}):\n{output[-6000:]}")


@pytest.mark.parametrize("strategy", [
    "topk",
    pytest.param("fedavg", marks=pytest.mark.slow),
    pytest.param("ssfl", marks=pytest.mark.slow),
    pytest.param("random", marks=pytest.mark.slow),
    pytest.param("magnitude", marks=pytest.mark.slow),
])
def test_a_run_stopped_and_resumed_ends_with_the_uninterrupted_model(tmp_path, strategy):
    """Three rounds in one go, vs two rounds then `--resume` to three, each its own Ray cluster. Before the
    resume, the clients' folders get the uninterrupted run's round-3 snapshots: what a run killed after its
    clients answered round 3 but before the server checkpointed it leaves. The resumed server re-runs round 3, so
    its clients must rewind to their round-2 state (for topk the residual; for the masked strategies the mask)."""
    settings = (*E2E, f"strategy={strategy}")
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_side_by_side((whole, (*settings, "num-rounds=3")), (part, (*settings, "num-rounds=2")))
    for partition in range(3):
        name = Path("client-state") / f"partition-{partition}" / "round-00000003.state"
        shutil.copyfile(whole / name, part / name)
    fedsparse_run(part, "num-rounds=3", extra=("--resume", str(part)))
    for partition in range(3):  # the abandoned round 3 was replaced by the re-run's (the same bytes)
        name = Path("client-state") / f"partition-{partition}" / "round-00000003.state"
        assert (part / name).read_bytes() == (whole / name).read_bytes(), name
    a, b = torch.load(whole / "final_model.pt"), torch.load(part / "final_model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ([row["test_accuracy"] for row in read_rounds(part / "rounds.csv")]
            == [row["test_accuracy"] for row in read_rounds(whole / "rounds.csv")])
