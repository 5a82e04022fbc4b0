"""The user-written ServerApp of `examples/user_server_app.py` (SSFL through Flower's own `Strategy.start`, with
a `CountingGrid`) in a Ray simulation with fedsparse's ClientApp: the model learns, and the bytes the grid counted
equal the sizes the payload formulas predict.

Each run is a subprocess (`python -m tests.test_user_app OUT SEED`) with its own Ray cluster: it runs the example
app through `fedsparse.simulation.simulate` (the run config reaches server and clients as under `flwr run`) and
records, from outside the app, the Flower `Result` and the counting grid the app made.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LEARNING, REPO

CLIENTS, ROUNDS, SPARSITY = 4, 4, 0.8
SETTINGS = {**dict(s.split("=", 1) for s in LEARNING), "num-clients": CLIENTS, "num-rounds": ROUNDS,
            "partitioner": "iid", "strategy": "ssfl"}


def run_user_app(out: Path, seed: int) -> dict:
    """(In the subprocess) run the example app in simulation; return what it did, as JSON-able values."""
    import torch

    import examples.user_server_app as user_app
    import server.server_app
    from fedsparse.config import resolve
    from fedsparse.simulation import simulate
    from server.grid import CountingGrid
    from server.strategies import SSFL

    torch.set_num_threads(1)
    made: dict = {}

    class RecordingGrid(CountingGrid):
        def __init__(self, grid) -> None:
            super().__init__(grid)
            made["grid"] = self

    real_start = SSFL.start

    def recording_start(self, *args, **kwargs):
        made["strategy"], made["result"] = self, real_start(self, *args, **kwargs)
        return made["result"]

    user_app.CountingGrid = RecordingGrid
    SSFL.start = recording_start
    server.server_app.app = user_app.app  # simulate() runs server.server_app:app: here, the user's app
    simulate(resolve({**SETTINGS, "seed": seed, "output-dir": str(out)}), ray_cpus=2)
    strategy, result, grid = made["strategy"], made["result"], made["grid"]
    return {
        "accuracy": [float(result.evaluate_metrics_serverapp[r]["accuracy"]) for r in range(ROUNDS + 1)],
        "bytes": {t: [b.down, b.up] for t, b in grid.by_type.items()},
        "kept": sum(int(m.sum()) for m in strategy.masks.values()), "num_maskable": strategy.layout.num_maskable,
        "num_dense": strategy.layout.num_dense, "fingerprint": strategy.fingerprint,
        "failures": strategy.failures.records,
    }


def user_app_run(tmp_path: Path, seed: int) -> dict:
    out = tmp_path / f"seed{seed}"
    proc = subprocess.run([sys.executable, "-m", "tests.test_user_app", str(out), str(seed)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "user_app.json").read_text())


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_the_user_written_app_learns_and_counts_the_bytes_the_payloads_predict(tmp_path, seed):
    got = user_app_run(tmp_path, seed)
    accuracy = got["accuracy"]
    print(f"seed {seed}: accuracy by round {[round(a, 3) for a in accuracy]}")
    assert accuracy[0] < 0.3 and max(accuracy[1:]) > 0.6, accuracy  # chance is 0.1; seeds 1-3 reach 0.8+
    assert got["failures"] == []
    kept, dense, p = got["kept"], got["num_dense"], got["num_maskable"]
    assert kept == round((1 - SPARSITY) * p)
    # the formulas: npy header 128 B per array + data + key names; 8 B per number in a record; fingerprint 16 chars
    fp = len("mask-fingerprint") + len(got["fingerprint"])
    payload = 2 * 128 + 4 * (kept + dense) + len("values") + len("dense")
    config_down = len("server-round") + 8 + len("lr") + 8 + len("value-dtype") + len("float32") + fp
    metrics_up = sum(len(k) + 8 for k in ("num-examples", "train-loss", "partition-id"))
    config_up = fp + len("server-round") + 8
    assert got["bytes"]["train"] == [ROUNDS * CLIENTS * (payload + config_down),
                                     ROUNDS * CLIENTS * (payload + metrics_up + config_up)]
    info_up = len("partition-id") + 8 + len("num-examples") + 8  # the request is empty
    saliency_config = len("server-round") + 8 + len("lr") + 8 + len("value-dtype") + len("float32") \
        + len("mask-fingerprint") + len("dense")
    saliency_down = 128 + 4 * (p + dense) + len("values") + 128 + len("dense") + saliency_config
    saliency_up = 128 + 4 * p + len("saliency") + len("num-examples") + 8 + len("partition-id") + 8
    install = len("fingerprint") + 16
    assert got["bytes"] == {
        "query.info": [0, CLIENTS * info_up],
        "query.saliency": [CLIENTS * saliency_down, CLIENTS * saliency_up],
        "query.install_mask": [CLIENTS * (128 + (p + 7) // 8 + len("bits") + install),
                               CLIENTS * (install + len("partition-id") + 8)],
        "train": got["bytes"]["train"],
    }


if __name__ == "__main__":  # the subprocess of user_app_run
    folder, seed_arg = Path(sys.argv[1]), int(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    record = run_user_app(folder, seed_arg)
    (folder / "user_app.json").write_text(json.dumps(record))
