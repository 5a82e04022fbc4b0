"""Flower ServerApp: resolves the run config and hands the grid to the round loop."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.loop import run_federation

logging.getLogger("fedsparse").setLevel(logging.INFO)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, dict(context.run_config))
