"""Run the app in-process through Flower's simulation engine (tests, benchmarks, notebooks).

``flwr run`` is the product's way in; this helper runs the very same ServerApp and ClientApp with
``flwr.simulation.run_simulation``, which hands the apps an empty run config. The wrappers below
fill it with the app's defaults plus overrides, exactly as ``flwr run --run-config`` would. They
live in an importable module because Ray pickles them into its actors; the overrides reach the
actors through an environment variable, which Ray workers inherit.

For reliability tests and measurements, ``faults`` makes chosen clients (by partition id) send a
faulty train reply every round: the real ``client_app.app.train`` runs and its reply is then
corrupted (``nan``, ``inf``, ``shape``, ``names``, ``norm``), or the client raises (``exception``).

    python -m harness.simulation --clients 10 --faults 0:exception,1:exception --results-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir
from flwr.serverapp import Grid, ServerApp

from flower_records import array_record, numpy_state

_ENV = "FEDMETANAS_SIMULATION_RUN_CONFIG"
_FAULTS_ENV = "FEDMETANAS_SIMULATION_FAULTS"
FAULT_KINDS = ("nan", "inf", "shape", "names", "norm", "exception")


def _app_dir() -> Path:
    """The directory of the app's pyproject.toml: the checkout's, or the installed wheel's copy."""
    from harness.cli import app_pyproject

    return app_pyproject().parent


def _run_config() -> dict[str, Any]:
    overrides = json.loads(os.environ.get(_ENV, "{}"))
    return dict(get_fused_config_from_dir(_app_dir(), overrides))


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from server_app.app import app

    context.run_config.update(_run_config())
    app(grid, context)


client_app = ClientApp()


def _with_config(context: Context) -> Context:
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config=_run_config(),
    )


def _fault(context: Context) -> str | None:
    faults = json.loads(os.environ.get(_FAULTS_ENV, "{}"))
    return faults.get(str(context.node_config.get("partition-id")))


class InjectedFault(RuntimeError):
    """What a client configured with the 'exception' fault raises."""


def corrupt_reply(reply: Message, kind: str, request: Message) -> Message:
    """A copy of a train reply made faulty the way ``kind`` says (the original is left as it is)."""
    state = {k: v.copy() for k, v in numpy_state(reply.content["arrays"]).items()}
    first = next(iter(state))
    if kind == "nan":
        state[first].reshape(-1)[0] = np.nan
    elif kind == "inf":
        state[first].reshape(-1)[0] = np.inf
    elif kind == "shape":
        state[first] = np.zeros((*state[first].shape, 2), dtype=state[first].dtype)
    elif kind == "names":
        state["renamed." + first] = state.pop(first)
    elif kind == "norm":
        state = {k: v * 1e6 for k, v in state.items()}
    else:
        raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")
    content = RecordDict(
        {
            "arrays": array_record(state),
            "metrics": reply.content["metrics"],
        }
    )
    return Message(content, reply_to=request)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    from client_app.app import train
    from client_app.privacy import dp_mod

    kind = _fault(context)
    if kind == "exception":  # raised before training: a client that crashes costs no CPU here
        raise InjectedFault(f"injected fault in partition {context.node_config.get('partition-id')}")
    reply = dp_mod(msg, _with_config(context), train)  # the run's client-side DP, as the real ClientApp's mods
    return corrupt_reply(reply, kind, msg) if kind else reply


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    from client_app.app import evaluate

    return evaluate(msg, _with_config(context))


def run_in_process(
    overrides: dict[str, Any],
    num_supernodes: int,
    cpus_per_client: int = 1,
    faults: dict[int, str] | None = None,
) -> None:
    """Blocks until the run ends; results go to ``overrides['results-dir']``.

    ``faults`` maps partition id -> one of FAULT_KINDS: that client's train replies are faulty.
    """
    from flwr.simulation import run_simulation

    faults = dict(faults or {})
    for pid, kind in faults.items():
        if kind not in FAULT_KINDS or not 0 <= int(pid) < num_supernodes:
            raise ValueError(
                f"fault {pid}:{kind}: need a partition id in [0, {num_supernodes}) and one of {', '.join(FAULT_KINDS)}"
            )
    os.environ[_ENV] = json.dumps(overrides)
    os.environ[_FAULTS_ENV] = json.dumps({str(int(pid)): kind for pid, kind in faults.items()})
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
        )
    finally:
        os.environ.pop(_FAULTS_ENV, None)


def parse_faults(text: str) -> dict[int, str]:
    """'0:exception,1:nan' -> {0: 'exception', 1: 'nan'}."""
    faults: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        pid, sep, kind = item.partition(":")
        if not sep or not pid.strip().isdigit() or kind.strip() not in FAULT_KINDS:
            raise ValueError(
                f"bad fault {item!r}: expected PARTITION_ID:KIND with KIND one of {', '.join(FAULT_KINDS)}"
            )
        faults[int(pid)] = kind.strip()
    return faults


def main(argv: list[str] | None = None) -> int:
    """Run the app in-process (optionally with faulty clients) and print the final accuracy."""
    from fedmetanas_core.run.config import ConfigError, RunConfig, resolve_method_tables
    from harness.cli import parse_run_config

    parser = argparse.ArgumentParser(prog="python -m harness.simulation", description=main.__doc__)
    parser.add_argument("--clients", type=int, default=10, help="simulated clients (SuperNodes)")
    parser.add_argument("--faults", default="", help="PARTITION_ID:KIND,...; KIND in " + ", ".join(FAULT_KINDS))
    parser.add_argument("--results-dir", required=True, help="where summary.json and rounds.jsonl go")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--run-config", "-c", action="append", default=[], help="'key=value ...' overrides")
    args = parser.parse_args(argv)
    try:
        faults = parse_faults(args.faults)
        overrides = resolve_method_tables(parse_run_config(args.run_config))
        overrides["results-dir"] = str(Path(args.results_dir).expanduser().resolve())
        # every client is sampled from round 1 on (the node-registration race), unless asked otherwise
        overrides.setdefault("min-available-nodes", args.clients)
        RunConfig.from_flat(dict(get_fused_config_from_dir(_app_dir(), overrides)))
        if args.clients < 1:
            raise ValueError("--clients must be >= 1")
        run_in_process(overrides, args.clients, args.cpus_per_client, faults)
    except (ConfigError, ValueError) as exc:
        print(f"simulation: error: {exc}", file=sys.stderr)
        return 2
    summary_path = Path(overrides["results-dir"]) / "summary.json"
    if not summary_path.is_file():
        print(f"simulation: the run did not complete: no {summary_path}", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text())
    rounds = [json.loads(line) for line in (summary_path.parent / "rounds.jsonl").read_text().splitlines() if line]
    skipped = sum(1 for r in rounds if not r.get("aggregated", True))
    print(
        json.dumps(
            {
                "final_test_accuracy": summary["final_test_accuracy"],
                "rounds": len(rounds),
                "rejected_per_round": [r.get("rejected") for r in rounds],
                "skipped_rounds": skipped,
                "faults": {str(k): v for k, v in faults.items()},
                "clients": args.clients,
                "total_time_s": summary.get("total_time_s"),
                "results_dir": overrides["results-dir"],
            }
        )
    )
    if skipped:  # e.g. the simulation's workers were killed: the accuracy is not a fair measurement
        print(
            f"simulation: warning: {skipped} of {len(rounds)} rounds were skipped (too few usable replies); "
            f"see rejected-reasons in rounds.jsonl",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
