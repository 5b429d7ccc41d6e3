"""One run of the app in this process, through ``LocalGrid``: no Ray, no SuperLink.

For machines that have torch and Flower's message types but no Ray (a lent GPU machine that cannot
install packages), and for timing client work without the transport. The ServerApp's loop
(``run_experiment``) and the ClientApp are the ones ``flwr run`` uses; clients train one after the
other in this process, so a round's time is the sum of its clients' work plus the server's.

    python -m benchmarks.inprocess -c conf/cifar10.toml -c "num-server-rounds=4" --clients 10 --results-dir DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedmetanas_core.method.training import run_settings
from harness.cli import resolve_run_config


def run(items: list[str], clients: int, results_dir: Path, run_id: int = 1) -> dict:
    from harness.local_grid import LocalGrid, task_identity
    from server_app.app import run_experiment

    _, cfg = resolve_run_config(
        [
            *items,
            f"results-dir={json.dumps(str(results_dir))}",
            f"num-partitions={clients}",
            f"min-available-nodes={clients}",
        ]
    )
    started = time.time()
    with task_identity(), run_settings(cfg):
        run_experiment(LocalGrid(run_id, dict(cfg), clients), cfg)
    summary = json.loads((results_dir / "summary.json").read_text())
    summary["inprocess_wall_s"] = round(time.time() - started, 2)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--run-config", action="append", default=[], help="preset file or 'key=value ...'")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--results-dir", type=Path, required=True)
    parser.add_argument(
        "--run-id", type=int, default=1, help="distinct per run in one process (clients cache configs by it)"
    )
    args = parser.parse_args(argv)
    summary = run(args.run_config, args.clients, args.results_dir, args.run_id)
    keys = ("method", "final_test_accuracy", "params", "inprocess_wall_s", "device")
    print(json.dumps({k: summary.get(k) for k in keys} | {"cost": summary.get("cost")}, default=str))


if __name__ == "__main__":
    main()
