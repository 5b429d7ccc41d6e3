"""Run the app in-process through Flower's simulation engine (tests, benchmarks, notebooks).

``flwr run`` is the product's way in; this helper runs the very same ServerApp and ClientApp with
``flwr.simulation.run_simulation``, which hands the apps an empty run config. The wrappers below
fill it with the app's defaults plus overrides, exactly as ``flwr run --run-config`` would. They
live in an importable module because Ray pickles them into its actors; the overrides reach the
actors through an environment variable, which Ray workers inherit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir
from flwr.serverapp import Grid, ServerApp

APP_DIR = Path(__file__).resolve().parents[1]
_ENV = "FEDMETANAS_SIMULATION_RUN_CONFIG"


def _run_config() -> dict[str, Any]:
    overrides = json.loads(os.environ.get(_ENV, "{}"))
    return dict(get_fused_config_from_dir(APP_DIR, overrides))


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from server_app.app import app

    context.run_config.update(_run_config())
    app(grid, context)


client_app = ClientApp()


def _with_config(context: Context) -> Context:
    return Context(
        run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
        state=context.state, run_config=_run_config(),
    )  # fmt: skip


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    from client_app.app import train

    return train(msg, _with_config(context))


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    from client_app.app import evaluate

    return evaluate(msg, _with_config(context))


def run_in_process(overrides: dict[str, Any], num_supernodes: int, cpus_per_client: int = 1) -> None:
    """Blocks until the run ends; results go to ``overrides['results-dir']``."""
    from flwr.simulation import run_simulation

    os.environ[_ENV] = json.dumps(overrides)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
    )
