"""``fedmetanas run``: validate the config, run ``flwr run --stream``, exit non-zero if the run failed.

``flwr run --stream`` exits 0 even when the run failed, and an invalid value would otherwise only
surface inside the ServerApp. This wrapper validates the merged run config first (one line naming
the key, no traceback), turns off Flower's per-run dependency installation (it would download
gigabytes), runs the app, and then checks the run's final status and its ``summary.json``: a run
that lost more than ``MAX_ERROR_SKIPPED_SHARE`` of its rounds to aggregation errors fails. The
CLI always sends an absolute ``results-dir`` (its own choice when none was given), so it knows
where to read the results. Defaults come from ``fedmetanas_core.config`` (the same values as
pyproject.toml; a test keeps them in step), so no checkout is needed to validate.
It never imports flwr: it drives the ``flwr`` command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import METHODS, ConfigError, RunConfig, defaults, resolve_method_tables

APP_DIR = Path(__file__).resolve().parents[1]
PATH_KEYS = ("data-dir", "results-dir", "fedavg-genotype")
MAX_ERROR_SKIPPED_SHARE = 0.2  # a run with more of its rounds skipped for errors exits non-zero


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _set(overrides: dict[str, Any], key: str, value: Any) -> None:
    """Later settings win: a plain key also replaces what earlier method tables said about it."""
    if "." not in key:
        for method in METHODS:
            overrides.pop(f"{method}.{key}", None)
    overrides[key] = value


def parse_run_config(items: list[str]) -> dict[str, Any]:
    """Same forms as ``flwr run --run-config``: a TOML file, or 'k1=v1 k2=v2' with TOML values."""
    overrides: dict[str, Any] = {}
    for item in items:
        path = Path(item)
        if path.suffix == ".toml" and "=" not in item:
            if not path.is_file():
                raise ConfigError("--run-config", item, "file not found")
            for key, value in _flatten(tomllib.loads(path.read_text())).items():
                _set(overrides, key, value)
            continue
        for pair in shlex.split(item, posix=False):
            key, sep, raw = pair.partition("=")
            if not sep:
                raise ConfigError(key, pair, "expected key=value")
            try:
                _set(overrides, key.strip(), tomllib.loads(f"v = {raw.strip()}")["v"])
            except tomllib.TOMLDecodeError:
                raise ConfigError(key.strip(), raw, "not a TOML value (strings need quotes)") from None
    return overrides


def error_skip_problem(summary: dict[str, Any], num_rounds: int) -> str | None:
    """One line when more than MAX_ERROR_SKIPPED_SHARE of the rounds were skipped for errors
    (not for too few replies): the run finished, but its results do not mean what they seem to."""
    errors = int(summary.get("skipped_rounds_error") or 0)
    if num_rounds and errors / num_rounds > MAX_ERROR_SKIPPED_SHARE:
        return (
            f"{errors} of {num_rounds} rounds were skipped for aggregation errors "
            f"(more than {MAX_ERROR_SKIPPED_SHARE:.0%}); see skipped-reason in rounds.jsonl"
        )
    return None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _run_status(connection: str, run_id: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        ["flwr", "ls", connection, "--run-id", run_id, "--format", "json"], capture_output=True, text=True, env=env
    )
    try:
        runs = json.loads(out.stdout).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (json.JSONDecodeError, AttributeError, IndexError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmetanas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="validate and run the Flower app, exit non-zero on failure")
    run.add_argument("--run-config", "-c", action="append", default=[], help="conf/<preset>.toml or 'key=value ...'")
    run.add_argument("--num-supernodes", type=int, default=10, help="simulated clients (local simulation)")
    run.add_argument("--cpus-per-client", type=int, default=1)
    run.add_argument("--connection", default="local", help="SuperLink connection in $FLWR_HOME/config.toml")
    run.add_argument("--app", default=str(APP_DIR), help="the Flower app directory")
    sub.add_parser("check", help="validate a run config only").add_argument("--run-config", "-c", action="append", default=[])
    args = parser.parse_args(argv)

    app_dir = Path(getattr(args, "app", APP_DIR)).resolve()
    try:
        base = defaults()
        # a preset's [fednas] / [fedavg] / [fedmetanas] tables: Flower accepts only known keys
        overrides = resolve_method_tables(parse_run_config(args.run_config), base["method"])
        for key in PATH_KEYS:  # the ServerApp runs in the SuperLink's directory: send absolute paths
            if isinstance(overrides.get(key), str) and overrides[key]:
                overrides[key] = str(Path(overrides[key]).expanduser().resolve())
        cfg = RunConfig.from_flat({**base, **overrides})
        if args.command == "run" and args.connection == "local":  # the simulated federation's size is known
            cfg.check_dp(cfg.num_partitions or args.num_supernodes)
        if ":" in cfg.strategy:
            from server_app.strategy import check_strategy  # imports flwr, so only for user classes

            check_strategy(cfg, app_dir=app_dir)
        results_dir = cfg.resolved_results_dir(datetime.now().strftime("%Y%m%d-%H%M%S"))
    except (ConfigError, OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"fedmetanas: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print("run config OK")
        return 0

    overrides["results-dir"] = str(results_dir)  # explicit and absolute: the checks below read it
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # flwr (and the SuperLink it starts) from this interpreter's environment, activated or not
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    }
    cmd = ["flwr", "run", str(app_dir), args.connection, "--stream"]
    cmd += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())]
    if args.connection == "local":
        cmd += ["--federation-config", f"num-supernodes={args.num_supernodes} client-resources-num-cpus={args.cpus_per_client}"]
    run_id = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            match = re.search(r"started run (\d+)", line)
            if match:
                run_id = match.group(1)
    if proc.returncode != 0:
        print(f"fedmetanas: flwr run exited with status {proc.returncode}", file=sys.stderr)
        return proc.returncode or 1
    status = _run_status(args.connection, run_id, env) if run_id else "unknown"
    summary = results_dir / "summary.json"
    if "completed" not in status or not summary.is_file():
        print(f"fedmetanas: run {run_id} did not complete (status: {status}; summary.json present: {summary.is_file()})", file=sys.stderr)
        return 1
    rounds = [json.loads(line) for line in (results_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    if not any(r.get("aggregated") for r in rounds):
        print(f"fedmetanas: run {run_id} aggregated no round (every round was skipped); see rounds.jsonl", file=sys.stderr)
        return 1
    result = json.loads(summary.read_text())
    problem = error_skip_problem(result, len(rounds))
    if problem:
        print(f"fedmetanas: run {run_id}: {problem}", file=sys.stderr)
        return 1
    print(f"fedmetanas: run {run_id} {status}: final test accuracy {result['final_test_accuracy']:.4f}; results in {results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
