"""Real Ray simulations through `fedsparse run`, as a user runs them: learning, results files, bytes on the
wire, bad clients, kill-and-resume. Each run is a subprocess with its own Ray cluster on 2 CPUs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsparse import sparse
from fedsparse.models import build_model, maskable_names
from fedsparse.results import read_rounds
from tests.conftest import LEARNING, REPO, fedsparse_run, summary

DIGITS = LEARNING
SSFL_ROUNDS = 8
SSFL10 = (*DIGITS, "num-clients=10", "partitioner=dirichlet", "dirichlet-alpha=0.5", f"num-rounds={SSFL_ROUNDS}")


TEST_TOKEN = "FEDSPARSE_TEST_RUN"  # env var naming the processes one test started (inherited by Ray's workers)


def kill_processes_started_with(token: str) -> list[int]:
    """SIGKILL every process whose environment holds `TEST_TOKEN=token`: the driver a test started and all it
    spawned (raylet, GCS, workers, re-parented to init or not), and nothing else on the machine. Returns the pids."""
    marker = f"{TEST_TOKEN}={token}".encode()
    killed = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def rounds(out):
    return read_rounds(out / "rounds.csv")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fedavg and SSFL (float32, float16) on the same federation, run once for the tests below."""
    base = tmp_path_factory.mktemp("sim")
    out = {}
    for name, extra in {"fedavg": ("strategy=fedavg",),
                        "ssfl": ("strategy=ssfl", "sparsity=0.9"),
                        "ssfl16": ("strategy=ssfl", "sparsity=0.9", "value-dtype=float16")}.items():
        out[name] = base / name
        fedsparse_run(out[name], *SSFL10, *extra)
    return out


def test_fedavg_on_5_clients_learns_and_its_files_agree(tmp_path):
    out = tmp_path / "fedavg5"
    proc = fedsparse_run(out, *DIGITS, "num-clients=5", "num-rounds=4", "strategy=fedavg")
    assert "round 4/4" in proc.stderr  # one progress line per round
    s, rows = summary(out), rounds(out)
    assert s["final_accuracy"] > 0.5, s["final_accuracy"]  # chance is 0.1; seeds 1-3 checked: 0.84 and up
    assert s["rounds"] == len(rows) == 4
    assert s["final_accuracy"] == pytest.approx(rows[-1]["test_accuracy"])
    assert s["best_accuracy"] == pytest.approx(max(r["test_accuracy"] for r in rows))
    assert s["bytes_down"] == sum(r["bytes_down"] for r in rows)
    assert s["bytes_up"] == sum(r["bytes_up"] for r in rows)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num-clients"] == 5 and cfg["strategy"] == "fedavg"
    assert (out / "curves.png").stat().st_size > 10_000
    for key in ("strategy", "final_accuracy", "best_accuracy", "rounds", "bytes_down", "bytes_up", "bytes_oneoff",
                "seconds"):
        assert key in s


def test_ssfl_learns_and_moves_9x_fewer_bytes_than_fedavg(runs):
    dense, ssfl, ssfl16 = (summary(runs[k]) for k in ("fedavg", "ssfl", "ssfl16"))
    print({k: round(summary(runs[k])["final_accuracy"], 4) for k in runs})
    assert ssfl["final_accuracy"] > 0.5 and ssfl16["final_accuracy"] > 0.5  # chance 0.1; seeds checked: 0.75-0.85
    per_round = {k: (summary(v)["bytes_down"] + summary(v)["bytes_up"]) / SSFL_ROUNDS for k, v in runs.items()}
    print({k: round(per_round["fedavg"] / v, 2) for k, v in per_round.items()})
    assert per_round["fedavg"] / per_round["ssfl"] >= 9
    assert per_round["fedavg"] / per_round["ssfl16"] >= 18
    assert ssfl["bytes_ratio_vs_dense"] == pytest.approx(per_round["fedavg"] / per_round["ssfl"], rel=1e-3)
    assert ssfl["density"] == pytest.approx(0.1, abs=1e-5) and dense["density"] == 1.0
    assert ssfl["bytes_oneoff"] > 0 and dense["bytes_oneoff"] > 0  # saliency + mask; node discovery


def test_every_client_holds_the_same_mask(runs):
    s = summary(runs["ssfl"])
    assert len(s["client_mask_fingerprints"]) == 10
    assert set(s["client_mask_fingerprints"].values()) == {s["mask_fingerprint"]}
    assert s["failures"] == []


@pytest.mark.parametrize("name,dtype,width", [("ssfl", "float32", 4), ("ssfl16", "float16", 2)])
def test_bytes_per_round_equal_the_formula(runs, name, dtype, width):
    s = summary(runs[name])
    model = build_model("cnn", (1, 16, 16), 10)
    layout = sparse.Layout.of(model.state_dict(), maskable_names(model))
    nnz = round(0.1 * layout.num_maskable)
    payload = 2 * 128 + (nnz + layout.num_dense) * width + len("values") + len("dense")  # npy headers + data + keys
    fp = s["mask_fingerprint"]
    config_down = (len("server-round") + 8) + (len("lr") + 8) + len("value-dtype") + len(dtype) \
        + len("mask-fingerprint") + len(fp)
    metrics_up = sum(len(k) + 8 for k in ("num-examples", "train-loss", "partition-id"))
    config_up = len("mask-fingerprint") + len(fp) + len("server-round") + 8  # the reply echoes mask and round
    for r in rounds(runs[name]):
        assert r["bytes_down"] == r["clients"] * (payload + config_down)
        assert r["bytes_up"] == r["clients"] * (payload + metrics_up + config_up)
        assert r["logical_up"] == r["clients"] * (nnz + layout.num_dense) * width
        assert r["bytes_up"] <= 1.01 * r["logical_up"] + r["clients"] * (2 * 128 + 200)


def test_one_off_bytes_equal_the_formula(runs):
    """Discovery for every strategy; SSFL adds the saliency round and the mask install, once per client."""
    model = build_model("cnn", (1, 16, 16), 10)
    layout = sparse.Layout.of(model.state_dict(), maskable_names(model))
    n, p = 10, layout.num_maskable
    discovery = n * (len("partition-id") + 8 + len("num-examples") + 8)  # the request is empty
    assert summary(runs["fedavg"])["bytes_oneoff"] == discovery
    config = (len("server-round") + 8) + (len("lr") + 8) + len("value-dtype") + len("float32") \
        + len("mask-fingerprint") + len("dense")
    saliency_down = 128 + 4 * (p + layout.num_dense) + len("values") + 128 + len("dense") + config
    saliency_up = 128 + 4 * p + len("saliency") + len("num-examples") + 8 + len("partition-id") + 8
    fp = len("fingerprint") + 16
    install_down = 128 + (p + 7) // 8 + len("bits") + fp
    install_up = fp + len("partition-id") + 8
    s = summary(runs["ssfl"])
    assert s["oneoff_down"] == n * (saliency_down + install_down)
    assert s["bytes_oneoff"] == discovery + n * (saliency_down + saliency_up + install_down + install_up)


def test_report_compares_runs_in_one_table_and_plot(runs, tmp_path, capsys):
    from fedsparse.cli import main as cli_main

    plot = tmp_path / "cmp.png"
    assert cli_main(["report", str(runs["fedavg"]), str(runs["ssfl16"]), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert f"| fedavg | fedavg | 1.00 | float32 | {SSFL_ROUNDS} |" in table
    assert f"| ssfl16 | ssfl | 0.10 | float16 | {SSFL_ROUNDS} |" in table
    assert plot.stat().st_size > 10_000
    assert cli_main(["report", str(tmp_path / "nothing")]) == 2


FAULT_APP = ("--client-app", "tests.faults:app")  # our ClientApp behind the test-only fault mod


@pytest.mark.parametrize("fault,reason", [
    ("huge-update", "exceeds 50 x the round's median norm"),  # 3e38 everywhere: once made the model NaN
    pytest.param("nan", "NaN", marks=pytest.mark.slow),
    pytest.param("huge-num-examples", "exceeds the", marks=pytest.mark.slow),
    pytest.param("stale-round", "stale reply", marks=pytest.mark.slow),
])
def test_a_client_sending_garbage_is_rejected_and_the_run_completes(tmp_path, monkeypatch, fault, reason):
    monkeypatch.setenv("FEDSPARSE_TEST_FAULT", f"2:{fault}")  # reaches the Ray workers through the environment
    out = tmp_path / "fault"
    fedsparse_run(out, *DIGITS, "num-clients=4", "num-rounds=2", "strategy=ssfl", "sparsity=0.5",
                  "partitioner=iid", extra=FAULT_APP)
    s, rows = summary(out), rounds(out)
    assert [r["rejected"] for r in rows] == [1, 1] and [r["clients"] for r in rows] == [3, 3]
    assert len(s["failures"]) == 2 and all(reason in f["reason"] for f in s["failures"]), s["failures"]
    assert s["best_accuracy"] > 0.5  # the other clients learned (seeds 1-3: 0.80-0.84 best in 2 rounds)


@pytest.mark.slow
def test_a_node_that_lost_its_mask_trains_again_in_simulation(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPARSE_TEST_FAULT", "1:lose-mask")  # partition 1 forgets its mask before round 2
    out = tmp_path / "rejoin"
    fedsparse_run(out, *DIGITS, "num-clients=3", "num-rounds=3", "strategy=random", "sparsity=0.5",
                  "partitioner=iid", "local-epochs=1", extra=FAULT_APP)
    s, rows = summary(out), rounds(out)
    assert [r["clients"] for r in rows] == [3, 2, 3]
    assert len(s["failures"]) == 1 and "no installed mask matches" in s["failures"][0]["reason"]


@pytest.mark.slow
def test_a_run_that_cannot_train_exits_non_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPARSE_TEST_FAULT", "0:huge-num-examples")  # the only client lies about its weight
    out = tmp_path / "untrainable"
    proc = fedsparse_run(out, "dataset=digits", "num-clients=1", "num-rounds=2", "model=mlp", extra=FAULT_APP,
                         check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "none of the 1 train replies was accepted" in proc.stderr
    assert not (out / "summary.json").exists()


def test_kill_and_resume_gives_the_same_final_model(tmp_path):
    settings = (*DIGITS, "num-clients=4", "num-rounds=5", "strategy=ssfl", "sparsity=0.8", "fraction-train=0.5")
    whole = tmp_path / "whole"
    fedsparse_run(whole, *settings)

    crashed = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "fedsparse.cli", "run", "--ray-cpus", "2", "--out", str(crashed), "--set", *settings]
    token = f"{os.getpid()}-{time.time_ns()}"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, TEST_TOKEN: token})
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (crashed / "rounds.csv").exists() and len(rounds(crashed)) >= 2:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_processes_started_with(token)  # Ray's processes outside the driver's process group
    done_before = len(rounds(crashed))
    assert 2 <= done_before < 5, "the run was not interrupted mid-way"
    assert not (crashed / "summary.json").exists()

    fedsparse_run(crashed, extra=("--resume", str(crashed)))
    assert len(rounds(crashed)) == 5
    a = torch.load(whole / "final_model.pt")
    b = torch.load(crashed / "final_model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["test_accuracy"] for r in rounds(crashed)] == [r["test_accuracy"] for r in rounds(whole)]
