"""Linear mode connectivity as federated rounds: the connectivity experiment (`server.experiments.connectivity`)
with its clients (`client.connectivity`), through the real runner and ClientApp on `digits` with the small MLP.

The alignment library itself (specs, weight matching, barriers, REPAIR) is checked in tests/test_alignment.py; here
only exact properties of the federated path: a model with itself has barrier 0, the permutation applied along
the trajectory leaves every checkpoint's function unchanged, the server's trajectory is the clients' models,
trajectory.csv has K-1 rows per round, a resumed run reports the same summary, and config errors name the key.
(Whether alignment lowers the barrier is a measurement, reported in the README, not a test.)
"""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from fedsparse.config import ConfigError, resolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = {"experiment": "connectivity", "dataset": "digits", "model": "mlp", "partitioner": "iid", "batch-size": 16,
       "lr": 0.05, "momentum": 0.5, "local-epochs": 1, "seed": 3}


def _cfg(out, clients: int = 3, rounds: int = 2, **conn: object) -> dict:
    keys = {"points": 5, "simplex-resolution": 2, "eval-examples": 0, "calibration-examples": 200, **conn}
    return resolve({**RUN, "output-dir": str(out), "num-clients": clients, "num-rounds": rounds, "conn": keys})


def _rows(path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _experiment_of(cfg: dict):
    """The experiment of a finished run folder, its trajectory restored from the run's checkpoint."""
    from pathlib import Path

    from server.experiments.connectivity import ConnectivityExperiment

    experiment = ConnectivityExperiment(cfg)
    experiment.load_state_dict(torch.load(Path(cfg["output-dir"]) / "checkpoint.pt", weights_only=False)["experiment"])
    return experiment


def test_a_model_with_itself_has_barrier_zero():
    from client.merging import tact_layers
    from fedsparse.alignment import dataset_evaluator, linear_barrier
    from fedsparse.data import load_dataset
    from fedsparse.models import build_model
    from server.experiments.connectivity import repaired_barrier

    data = load_dataset("digits")
    model = build_model("mlp", data.input_shape, data.num_classes, seed=1)
    state = model.state_dict()
    evaluate = dataset_evaluator(data.x_test, data.y_test)
    plain = linear_barrier(model, state, state, evaluate, num_points=7)
    assert plain.loss_barrier == 0.0 and plain.accuracy_barrier == 0.0
    batches = [torch.from_numpy(data.x_train[:200])]
    repaired = repaired_barrier(model, state, state, evaluate, tact_layers(model), batches, num_points=7)
    assert repaired.loss_barrier == pytest.approx(0.0, abs=1e-5)  # REPAIR of a model with itself: identity affines
    assert repaired.accuracy_barrier == 0.0
    assert [w[1] for w in repaired.weights] == pytest.approx([i / 6 for i in range(7)])


@pytest.fixture(scope="module")
def three_client_run(tmp_path_factory):
    """One 2-round run of 3 clients (digits, mlp), shared by the checks below."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.loop import run_federation
    from tests.test_continual_federated import AppGrid

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _cfg(tmp_path_factory.mktemp("conn") / "run")
        grid = AppGrid(cfg, 3)
        summary = run_federation(grid, cfg)
    finally:
        torch.set_num_threads(previous)
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old
    return cfg, grid, summary


def test_the_trajectory_is_the_clients_models_and_csv_has_k_minus_1_rows_per_round(three_client_run):
    from pathlib import Path

    from client.connectivity import OWN_MODEL, own_init_state

    cfg, grid, summary = three_client_run
    out = Path(cfg["output-dir"])
    assert grid.handled.count("train.connectivity") == 6
    experiment = _experiment_of(cfg)
    assert sorted(experiment.trajectory) == [1, 2] and all(sorted(m) == [0, 1, 2] for m in experiment.trajectory.values())
    for partition in range(3):  # the server's last checkpoint is what the client kept (received + update)
        kept = grid.contexts[100 + partition].state[OWN_MODEL].to_torch_state_dict()
        for key, value in kept.items():
            assert torch.allclose(experiment.trajectory[2][partition][key], value, rtol=0, atol=1e-6)
    initial = [own_init_state(cfg, p) for p in range(3)]
    assert not torch.equal(initial[0]["1.weight"], initial[1]["1.weight"])  # own seeds
    final = torch.load(out / "final_model.pt")
    assert all(torch.equal(final[k], experiment.trajectory[2][0][k]) for k in final)  # the global model is client 0's
    rows = _rows(out / "trajectory.csv")
    assert [(int(r["round"]), int(r["client"])) for r in rows] == [(r, c) for r in (0, 1, 2) for c in (1, 2)]
    for row in rows:
        for variant in ("plain", "aligned", "repair"):
            assert float(row[f"loss_barrier_{variant}"]) >= 0 and 0 <= float(row[f"accuracy_barrier_{variant}"]) <= 1
    assert (out / "trajectory.png").stat().st_size > 0
    last = {int(r["client"]): r for r in rows if r["round"] == "2"}
    for client in (1, 2):
        entry = summary["conn_final_barriers"][f"client-{client}"]
        assert entry["loss_barrier_aligned"] == pytest.approx(float(last[client]["loss_barrier_aligned"]))
        assert entry["accuracy_barrier_plain"] == pytest.approx(float(last[client]["accuracy_barrier_plain"]))
    assert set(summary["conn_simplex"]) == {"loss_barrier_plain", "loss_barrier_aligned", "accuracy_barrier_plain",
                                            "accuracy_barrier_aligned"}
    assert summary["conn_client_accuracy"]["client-0"] == pytest.approx(summary["final_accuracy"])
    assert min(summary["conn_client_accuracy"].values()) > 0.25  # 10 classes: every client learnt something


def test_the_permutation_applied_along_the_trajectory_leaves_every_checkpoint_unchanged(three_client_run):
    from fedsparse.data import load_dataset
    from fedsparse.models import build_model

    cfg, _, _ = three_client_run
    experiment = _experiment_of(cfg)
    permutations = experiment.alignment()
    assert sorted(permutations) == [1, 2]
    assert any(not torch.equal(index, torch.arange(len(index))) for perm in permutations.values()
               for index in perm.values())  # weight matching moved units
    inputs = torch.from_numpy(load_dataset("digits").x_test[:100])
    plain, aligned = experiment.checkpoints(), experiment.aligned_checkpoints(permutations)
    assert sorted(plain) == sorted(aligned) == [0, 1, 2]
    net, twin = build_model("mlp", (1, 16, 16), 10), build_model("mlp", (1, 16, 16), 10)
    for round_, models in plain.items():
        assert all(torch.equal(models[0][k], aligned[round_][0][k]) for k in models[0])  # client 0 is the reference
        for client in (1, 2):
            net.load_state_dict(models[client])
            twin.load_state_dict(aligned[round_][client])
            assert not torch.equal(models[client]["1.weight"], aligned[round_][client]["1.weight"])
            with torch.no_grad():
                assert torch.allclose(net(inputs), twin(inputs), rtol=0, atol=1e-5)


def test_a_run_killed_mid_way_and_resumed_gives_the_same_summary(tmp_path, task_identity):
    from server.loop import run_federation
    from tests.test_continual_federated import AppGrid, Stop

    whole_cfg = _cfg(tmp_path / "whole", clients=2, rounds=3, repair=False)
    whole = run_federation(AppGrid(whole_cfg, 2), whole_cfg)
    part_cfg = _cfg(tmp_path / "part", clients=2, rounds=3, repair=False)
    with pytest.raises(Stop):
        run_federation(AppGrid(part_cfg, 2, stop_after=2), part_cfg)
    resumed_cfg = part_cfg | {"resume": True}
    resumed = run_federation(AppGrid(resumed_cfg, 2), resumed_cfg)
    for key in ("conn_final_barriers", "conn_final_barriers_mean", "conn_client_accuracy", "final_accuracy"):
        assert resumed[key] == whole[key], key
    assert "conn_simplex" not in whole  # 2 clients: no 3-way barrier
    assert (tmp_path / "whole" / "trajectory.csv").read_text() == (tmp_path / "part" / "trajectory.csv").read_text()
    shutil.rmtree(tmp_path / "part")


@pytest.mark.parametrize(("settings", "key"), [
    ({"strategy": "ssfl"}, "'strategy'"),
    ({"fraction-train": 0.5}, "'fraction-train'"),
    ({"num-clients": 1}, "'num-clients'"),
    ({"experiment": "standard", "conn": {"points": 7}}, "conn.points"),
    ({"conn": {"data": "half"}}, "conn.data"),
    ({"conn": {"points": 1}}, "conn.points"),
])
def test_the_config_refuses_what_a_connectivity_run_cannot_do(tmp_path, settings, key):
    from server.experiments.connectivity import ConnectivityExperiment

    with pytest.raises(ConfigError, match=key):
        cfg = resolve({**RUN, "output-dir": str(tmp_path), "num-clients": 3, "num-rounds": 1, **settings})
        ConnectivityExperiment.check_config(cfg)


@pytest.mark.parametrize("data", ["full", "partition"])
def test_the_info_handler_reports_what_the_client_trains_on(data):
    from client.connectivity import training_data
    from client.handlers import HANDLERS, local_data

    cfg = resolve({**RUN, "num-clients": 3, "num-rounds": 1, "conn": {"data": data}})
    reply = HANDLERS["query.info"](_empty(), _empty(), cfg, 2)
    expected = 1442 if data == "full" else len(local_data(cfg, 2)[1])
    assert reply["metrics"]["num-examples"] == len(training_data(cfg, 2)[1]) == expected


def _empty():
    from flwr.app import RecordDict

    return RecordDict()


def test_the_preset_resolves_and_passes_the_experiment_check():
    import tomllib

    from server.experiments.connectivity import ConnectivityExperiment
    from tests.conftest import REPO

    cfg = resolve(tomllib.loads((REPO / "simulations" / "presets" / "connectivity.toml").read_text()))
    assert cfg["experiment"] == "connectivity" and cfg["num-clients"] == 3
    ConnectivityExperiment.check_config(cfg)
