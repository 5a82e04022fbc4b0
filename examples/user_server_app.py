"""A user-written Flower ServerApp that runs fedsparse's SSFL with Flower's own `Strategy.start`.

Nothing here is fedsparse's runner: the strategy is a Flower strategy, the counting grid is a wrapper any Grid
fits in, and the central evaluation is Flower's `evaluate_fn`. The clients run fedsparse's ClientApp; to run it,
point `serverapp` under `[tool.flwr.app.components]` of pyproject.toml at `examples.user_server_app:app` and
`flwr run .` (tests/test_user_app.py runs it in a Ray simulation). The settings come from the run config
(`fedsparse.config`: dataset, model, num-clients, num-rounds, lr, seed).
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedsparse.config import resolve
from fedsparse.data import load_dataset
from fedsparse.models import build_model, maskable_names
from fedsparse.train import evaluate
from server.grid import CountingGrid
from server.strategies import SSFL

log = logging.getLogger("fedsparse")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """SSFL at 80% sparsity for `num-rounds` rounds, the global model scored on the test set after each."""
    cfg = resolve(context.run_config)
    data = load_dataset(cfg["dataset"], cfg["data-root"])
    model = build_model(cfg["model"], data.input_shape, data.num_classes, seed=cfg["seed"])
    strategy = SSFL(maskable=maskable_names(model), sparsity=0.8, num_clients=cfg["num-clients"],
                    min_available_nodes=cfg["num-clients"], lr=cfg["lr"], seed=cfg["seed"])

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, data.x_test, data.y_test)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    counting = CountingGrid(grid)
    strategy.start(grid=counting, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg["num-rounds"],
                   evaluate_fn=central_evaluation)
    log.info("bytes per round traffic %s, one-off %s", counting.rounds(), counting.one_off())
