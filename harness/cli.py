"""``fedmetanas run``: validate the config, run the app with ``flwr``, exit non-zero if the run failed.

``flwr run --stream`` exits 0 even when the run failed, and an invalid value would otherwise only
surface inside the ServerApp. This wrapper validates the merged run config first (one line naming
the key, no traceback), turns off Flower's per-run dependency installation (it would download
gigabytes), runs the app, and then checks the run's final status and its ``summary.json``: a run
that lost more than ``MAX_ERROR_SKIPPED_SHARE`` of its rounds to aggregation errors fails. The
CLI always sends an absolute ``results-dir`` (its own choice when none was given), so it knows
where to read the results. The run is started with ``flwr run --format json`` (its run id read
from Flower's JSON, not from wording meant for people) and its log streamed with ``flwr log``.
Defaults come from ``fedmetanas_core.run.config`` (the same values as
pyproject.toml; a test keeps them in step), so no checkout is needed to validate.
It never imports flwr: it drives the ``flwr`` command.

``--ray-address`` runs the simulation on an existing Ray cluster (docs/scale.md). Flower 1.42 has
no setting for that: its Ray backend calls ``ray.init()``, which attaches to ``RAY_ADDRESS`` when
that is in the environment of the SuperLink's simulation process. A SuperLink that is already
running keeps the environment it was started with, so this CLI starts a private one for the run
(own FLWR_HOME and ports, with RAY_ADDRESS set) and stops it by PID afterwards. It does so for every
local simulation, not only on a cluster: ``flwr run`` reuses whatever local SuperLink listens on the
default ports, and one left by another checkout or environment runs the app with that one's code
(the run fails with no message), and a detached SuperLink would outlive the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

from fedmetanas_core.run import config_keys
from fedmetanas_core.run.config import ConfigError, RunConfig, defaults, resolve_method_tables
from fedmetanas_core.util.processes import stop_pids

# The Flower app directory that `flwr run` builds its FAB from. In a checkout (or an editable
# install) it is the checkout; an installed wheel has no pyproject.toml beside its packages, so the
# wheel ships the app's pyproject.toml (pyproject's hatch force-include) at PACKAGED_PYPROJECT and
# the CLI builds an app directory from it and the installed packages for each run.
SOURCE_ROOT = Path(__file__).resolve().parents[1]
PACKAGED_PYPROJECT = Path(__file__).resolve().parent / "flower_app" / "pyproject.toml"
PATH_KEYS = ("data-dir", "results-dir", "fedavg-genotype", "latency-table")
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
        for method in config_keys.METHODS:
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


# Ray's own address forms: HOST:PORT (a GCS address, from a cluster node) or ray://HOST:PORT (Ray
# Client, from outside the cluster); HOST may be a bracketed IPv6 address
_RAY_ADDRESS = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$")


def check_ray_address(address: str) -> str:
    """The address as given, or ConfigError naming --ray-address (before anything starts)."""
    match = _RAY_ADDRESS.match(address.strip())
    if not match or not 1 <= int(match.group(3)) <= 65535:
        raise ConfigError(
            "--ray-address",
            address,
            "expected HOST:PORT (on a cluster node) or ray://HOST:PORT (Ray Client)",
            source="flag",
        )
    return address.strip()


def check_flags(args: argparse.Namespace) -> None:
    """The simulation flags, validated up front like the run config (one line naming the flag)."""
    if args.num_supernodes < 1:
        raise ConfigError("--num-supernodes", args.num_supernodes, "must be >= 1", source="flag")
    if args.cpus_per_client < 1:
        raise ConfigError("--cpus-per-client", args.cpus_per_client, "must be an integer >= 1", source="flag")
    gpus = args.gpus_per_client
    if gpus is not None and not (math.isfinite(gpus) and gpus > 0):
        raise ConfigError(
            "--gpus-per-client", gpus, "must be > 0 (a fraction such as 0.25 shares one GPU)", source="flag"
        )
    if args.connection != "local":
        for flag, value in (("--ray-address", args.ray_address), ("--gpus-per-client", gpus)):
            if value is not None:  # a deployment's SuperNodes bring their own hardware
                raise ConfigError(
                    flag,
                    value,
                    f"applies to the local simulation only, not to --connection {args.connection}",
                    source="flag",
                )
    if args.ray_address is not None:
        check_ray_address(args.ray_address)
    if args.connection == "local":  # the private SuperLink takes the caller's ports when set
        for var in ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT"):
            port = os.environ.get(var)
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError(var, port, "must be a port number (environment variable)", source="env")
            if port and listening(int(port)) and args.ray_address is not None:
                raise ConfigError(
                    "--ray-address",
                    args.ray_address,
                    f"{var}={port} is in use (a running SuperLink keeps its own environment and would not "
                    f"use the Ray cluster); unset it to get free ports",
                    source="flag",
                )
            if port and listening(int(port)):
                raise ConfigError(
                    var,
                    port,
                    "is in use (another SuperLink?): this run's own SuperLink could not listen there; "
                    "unset it to get free ports",
                    source="env",
                )


def listening(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:port (a port in TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def flwr_env(base: dict[str, str]) -> dict[str, str]:
    """``base`` plus what every ``flwr`` command of ours needs: Flower's per-run dependency
    installation off, and flwr (and the SuperLink it starts) from this interpreter's environment,
    activated or not."""
    return {
        **base,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), base.get("PATH", "")]),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateSuperLink:
    """The environment for a ``flwr run`` whose auto-started local SuperLink is this run's own:
    a fresh FLWR_HOME, free ports (or the FLWR_LOCAL_* ports the caller set), RAY_ADDRESS. ``stop``
    ends that SuperLink and the processes below it, found by their PIDs."""

    def __init__(self, ray_address: str | None, env: dict[str, str]) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="fedmetanas-flwr-"))
        http = env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT") or str(_free_port())
        control = env.get("FLWR_LOCAL_CONTROL_API_PORT") or str(_free_port())
        self.env = {
            **env,
            "FLWR_HOME": str(self.home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": http,
            "FLWR_LOCAL_CONTROL_API_PORT": control,
        }
        if ray_address:  # else RAY_ADDRESS stays as the caller's environment has it
            self.env["RAY_ADDRESS"] = ray_address

    def _pids(self) -> list[int]:
        """The SuperLink (its command line holds our private FLWR_HOME) and its descendants."""
        pattern = re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", str(self.home))  # a POSIX ERE, literal
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        pids, todo = [], [int(p) for p in found]
        while todo:
            pid = todo.pop()
            if pid not in pids and pid != os.getpid():
                pids.append(pid)
                children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
                todo += [int(c) for c in children]
        return pids

    def stop(self, keep_home: bool) -> None:
        try:
            pids = self._pids()
        except OSError as exc:  # no pgrep
            port = self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
            print(
                f"fedmetanas: warning: cannot find the private SuperLink ({exc}); stop the one on port {port} yourself",
                file=sys.stderr,
            )
            return
        stop_pids(pids, grace_s=10)
        if keep_home:
            print(f"fedmetanas: the private SuperLink's log is in {self.home / 'local-superlink'}", file=sys.stderr)
        else:
            shutil.rmtree(self.home, ignore_errors=True)


def _is_app_pyproject(path: Path) -> bool:
    """This app's pyproject.toml (not some other project's file that happens to sit there)."""
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return config.get("project", {}).get("name") == "fedmetanas" and "app" in config.get("tool", {}).get("flwr", {})


def checkout_dir() -> Path | None:
    """The source checkout this package runs from (editable install, or PYTHONPATH), else None."""
    return SOURCE_ROOT if _is_app_pyproject(SOURCE_ROOT / "pyproject.toml") else None


def app_pyproject() -> Path:
    """The app's pyproject.toml: the checkout's, else the copy an installed wheel carries."""
    root = checkout_dir()
    if root is not None:
        return root / "pyproject.toml"
    if _is_app_pyproject(PACKAGED_PYPROJECT):
        return PACKAGED_PYPROJECT
    raise FileNotFoundError(
        f"the Flower app's pyproject.toml is neither in a checkout ({SOURCE_ROOT}) nor in the installed package "
        f"({PACKAGED_PYPROJECT}); reinstall fedmetanas, or pass --app with the app directory"
    )


def materialise_app(dest: Path) -> Path:
    """A Flower app directory in ``dest`` for ``flwr run`` from an installed wheel: the shipped
    pyproject.toml and copies of the packages the wheel installs, as a checkout would give them
    (the FAB then carries the code, so a remote SuperLink's nodes get it too)."""
    import importlib.util

    pyproject = app_pyproject()
    packages = tomllib.loads(pyproject.read_text()).get("tool", {}).get("hatch", {}).get("build", {})
    packages = packages.get("targets", {}).get("wheel", {}).get("packages", [])
    if not packages:
        raise FileNotFoundError(f"{pyproject} lists no packages ([tool.hatch.build.targets.wheel] packages)")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pyproject, dest / "pyproject.toml")
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {name!r}, part of the Flower app, is not installed")
        source = Path(list(spec.submodule_search_locations)[0])
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", PACKAGED_PYPROJECT.parent.name)
        shutil.copytree(source, dest / name, ignore=ignore)
    return dest


def stage_app(source: Path, dest: Path) -> Path:
    """A copy in ``dest`` of only what the FAB holds: pyproject.toml and the files its
    ``[tool.flwr.app] fab-include`` patterns match. ``flwr run`` walks every file under the app
    directory to build the FAB, a checkout's .venv and results included (~59,000 files, ~3 s of
    start-up here); the FAB built from the copy is the same. ``source`` itself when the pyproject
    lists no patterns (nothing says what the FAB leaves out)."""
    config = tomllib.loads((source / "pyproject.toml").read_text())
    patterns = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not patterns:
        return source
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "pyproject.toml", dest / "pyproject.toml")
    for pattern in patterns:
        for path in source.glob(pattern):
            if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
                target = dest / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    return dest


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


def resolve_run_config(items: list[str]) -> tuple[dict[str, Any], RunConfig]:
    """``-c`` items (preset files, 'key=value ...') -> the overrides, paths made absolute, and the
    validated config."""
    base = defaults()
    # a preset's [fednas] / [fedavg] / [fedmetanas] tables: Flower accepts only known keys
    overrides = resolve_method_tables(parse_run_config(items), base["method"])
    for key in PATH_KEYS:  # the ServerApp runs in the SuperLink's directory: send absolute paths
        if isinstance(overrides.get(key), str) and overrides[key]:
            paths = config_keys.parse_latency_tables(overrides[key]) if key == "latency-table" else [overrides[key]]
            overrides[key] = ",".join(str(Path(p).expanduser().resolve()) for p in paths)
    return overrides, RunConfig.from_flat({**base, **overrides})


def check_budget_up_front(cfg: RunConfig) -> None:
    """A budget that nothing in the space meets is refused before anything starts, where the data's
    shape is known without loading it (otherwise the ServerApp refuses at its start); with device
    tiers, every tier's budget."""
    if cfg.tiers:
        from fedmetanas_core.federation.tiered import naming_tiers, tier_config
        from fedmetanas_core.method.tiers import run_tiers

        for tier in run_tiers(cfg):
            with naming_tiers(cfg, tier):
                check_budget_up_front(tier_config(cfg, tier))
        return
    if not cfg.budget:
        return
    from fedmetanas_core.method.budget import check_feasible, fixed_network_width, known_run_space
    from fedmetanas_core.method.genotype import Genotype

    known = known_run_space(cfg)
    if known is None:
        return
    space, image_hw = known
    if cfg.method == "fedavg":
        genotype = Genotype.load_yaml(cfg.fedavg_genotype) if cfg.fedavg_genotype else None
        fixed_network_width(cfg, space, image_hw, genotype)
    else:
        check_feasible(cfg, space, image_hw)


def profile_command(cfg: RunConfig, args: argparse.Namespace) -> int:
    """``fedmetanas profile``: the latency table of the run's space, measured on this machine."""
    from fedmetanas_core.deployment.latency import PROFILE_RUNS, LatencyTable, default_runtime, profile_space
    from fedmetanas_core.method.budget import run_space

    space, image_hw = run_space(cfg)
    args.runs = args.runs or PROFILE_RUNS
    if args.add_cnn:
        return add_cnn_command(space, image_hw, args)
    runtime = args.runtime or default_runtime()
    print(
        f"fedmetanas: profiling {len(space.primitives)} ops of the {cfg.dataset} space at {image_hw[0]}x{image_hw[1]} "
        f"(init-channels {space.init_channels}) with {runtime}, batch 1, one thread, median of {args.runs} runs"
    )
    table = LatencyTable(profile_space(space, image_hw, runtime, args.runs, progress=print))
    table.save(args.out)
    print(
        f'fedmetanas: wrote {args.out}; pass it as -c \'latency-table="{Path(args.out).resolve()}" '
        f'budget="latency-ms:..."\''
    )
    return 0


def add_cnn_command(space, image_hw: tuple[int, int], args: argparse.Namespace) -> int:
    """``fedmetanas profile --add-cnn``: the small CNN's entries added to an existing table."""
    from fedmetanas_core.deployment.latency import LatencyTable, add_cnn_entries

    try:
        table = LatencyTable.load(args.out)
    except ValueError as exc:
        print(f"fedmetanas: --out: {exc}", file=sys.stderr)
        return 2
    problem = table.mismatch(space, image_hw)
    if problem:
        print(f"fedmetanas: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    speed = add_cnn_entries(table, space, image_hw, args.runs)["machine_speed_vs_table"]
    table.save(args.out)
    widths = ", ".join(f"{w}: {ms:.4f}" for w, ms in sorted(table.cnn_ms().items()))
    print(
        f"fedmetanas: added the small CNN to {args.out} (ms by width, at the table's speed; "
        f"this machine {speed:.3f}x): {widths}"
    )
    return 0


def run_command(items: list[str], num_supernodes: int | None = None) -> list[str]:
    """The ``fedmetanas run`` command line (this Python, this module) for ``-c`` items: what the
    benchmarks start as a real process."""
    cmd = [sys.executable, "-m", "harness.cli", "run"]
    if num_supernodes is not None:
        cmd += ["--num-supernodes", str(num_supernodes)]
    return cmd + [x for item in items for x in ("-c", item)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmetanas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="validate and run the Flower app, exit non-zero on failure")
    run.add_argument("--run-config", "-c", action="append", default=[], help="conf/<preset>.toml or 'key=value ...'")
    run.add_argument("--num-supernodes", type=int, default=10, help="simulated clients (local simulation)")
    run.add_argument("--cpus-per-client", type=int, default=1, help="Ray CPUs per simulated client (integer)")
    run.add_argument(
        "--gpus-per-client",
        type=float,
        default=None,
        help="Ray GPUs per simulated client, > 0; a fraction shares a GPU (0.25: four clients per GPU)",
    )
    run.add_argument(
        "--ray-address",
        default=None,
        help="run the simulation on this existing Ray cluster: HOST:PORT on a cluster node, ray://HOST:PORT from "
        "outside (docs/scale.md)",
    )
    run.add_argument("--connection", default="local", help="SuperLink connection in $FLWR_HOME/config.toml")
    run.add_argument(
        "--app",
        default=None,
        help="the Flower app directory (default: the checkout, or one built from the installed package)",
    )
    sub.add_parser("check", help="validate a run config only").add_argument(
        "--run-config", "-c", action="append", default=[]
    )
    profile = sub.add_parser("profile", help="measure the latency table of the run config's space on this machine")
    profile.add_argument(
        "--run-config", "-c", action="append", default=[], help="conf/<preset>.toml or 'key=value ...'"
    )
    profile.add_argument("--out", required=True, help="the table's JSON file (pass it as latency-table)")
    profile.add_argument(
        "--runs",
        type=int,
        default=None,
        help="timed runs per op and network (median over blocks of 10; default latency.PROFILE_RUNS)",
    )
    profile.add_argument(
        "--runtime", choices=("onnxruntime", "torch"), default=None, help="default: onnxruntime when installed"
    )
    profile.add_argument(
        "--add-cnn",
        action="store_true",
        help="add the small CNN's entries to the table at --out (profiled before it had them), timed beside its "
        "calibration networks",
    )
    args = parser.parse_args(argv)

    app_dir = Path(args.app).resolve() if getattr(args, "app", None) else None
    made_app_dir: Path | None = None  # the app staged for this run (from the checkout or the package), removed after it
    try:
        if args.command == "run":
            check_flags(args)
        overrides, cfg = resolve_run_config(args.run_config)
        if args.command == "profile":
            return profile_command(cfg, args)
        check_budget_up_front(cfg)
        if args.command == "run" and args.connection == "local":  # the simulated federation's size is known
            cfg.check_dp(cfg.num_partitions or args.num_supernodes)
        if ":" in cfg.strategy:
            from server_app.strategy import check_strategy  # imports flwr, so only for user classes

            check_strategy(cfg, app_dir=app_dir or checkout_dir())
        results_dir = cfg.resolved_results_dir(datetime.now().strftime("%Y%m%d-%H%M%S"))
        if args.command == "run" and app_dir is None:
            checkout = checkout_dir()
            made_app_dir = Path(tempfile.mkdtemp(prefix="fedmetanas-app-"))
            app_dir = stage_app(checkout, made_app_dir) if checkout else materialise_app(made_app_dir)
    except (ConfigError, OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        if made_app_dir:
            shutil.rmtree(made_app_dir, ignore_errors=True)
        print(f"fedmetanas: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print("run config OK")
        return 0

    overrides["results-dir"] = str(results_dir)  # explicit and absolute: the checks below read it
    env = flwr_env(
        {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
    )
    cmd = ["flwr", "run", str(app_dir), args.connection, "--format", "json"]
    cmd += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())]
    if args.connection == "local":
        # no init-args: Ray refuses num_cpus/num_gpus in ray.init when it attaches to a cluster
        federation = f"num-supernodes={args.num_supernodes} client-resources-num-cpus={args.cpus_per_client}"
        if args.gpus_per_client is not None:
            federation += f" client-resources-num-gpus={args.gpus_per_client}"
        cmd += ["--federation-config", federation]
    private = PrivateSuperLink(args.ray_address, env) if args.connection == "local" else None
    if private:
        env = private.env
    if args.ray_address:
        print(
            f"fedmetanas: simulation on the Ray cluster at {args.ray_address}, through a private local SuperLink "
            f"(127.0.0.1:{env['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']}, FLWR_HOME={private.home})"
        )
    elif os.environ.get("RAY_ADDRESS"):
        print(
            f"fedmetanas: note: RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set; the run's local SuperLink attaches "
            f"its simulation to that Ray cluster"
        )
    rc = 1
    try:
        rc = _stream_and_check(cmd, env, args.connection, results_dir)
    finally:
        if private:  # also on Ctrl-C: the SuperLink would outlive the run
            private.stop(keep_home=rc != 0)
        if made_app_dir:  # flwr run has sent the FAB by now
            shutil.rmtree(made_app_dir, ignore_errors=True)
    return rc


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def parse_run_id(output: str) -> str | None:
    """The run id in ``flwr run --format json``'s output (``{"success": true, "run-id": "..."}``),
    or None; colour codes and any text around the JSON object are skipped."""
    text, decoder = _ANSI.sub("", output), json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("success") is True and obj.get("run-id") not in (None, ""):
            return str(obj["run-id"])
    return None


def _start_run(cmd: list[str], env: dict[str, str]) -> tuple[int, str | None, str]:
    """Run ``flwr run --format json`` (it returns once the run is submitted): (exit status, run id,
    output). Flower's JSON mode can exit 0 when the run did not start; then the run id is None."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        output = "".join(proc.stdout)
    return proc.returncode, parse_run_id(output), output


def _stream_and_check(cmd: list[str], env: dict[str, str], connection: str, results_dir: Path) -> int:
    """Start the run, stream its log with ``flwr log --stream``, then check its status and results."""
    rc, run_id, output = _start_run(cmd, env)
    if rc != 0 or run_id is None:
        sys.stdout.write(output)
        why = f"exited with status {rc}" if rc else "started no run (no run id in its JSON output)"
        print(f"fedmetanas: flwr run {why}", file=sys.stderr)
        return rc or 1
    print(f"fedmetanas: started run {run_id}", flush=True)
    log_cmd = ["flwr", "log", run_id, connection, "--stream"]
    with subprocess.Popen(log_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
    if proc.returncode != 0:
        print(f"fedmetanas: flwr log exited with status {proc.returncode}", file=sys.stderr)
        return proc.returncode or 1
    status = _run_status(connection, run_id, env) if run_id else "unknown"
    summary = results_dir / "summary.json"
    if "completed" not in status or not summary.is_file():
        print(
            f"fedmetanas: run {run_id} did not complete (status: {status}; summary.json present: {summary.is_file()})",
            file=sys.stderr,
        )
        return 1
    rounds = [json.loads(line) for line in (results_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    if not any(r.get("aggregated") for r in rounds):
        print(
            f"fedmetanas: run {run_id} aggregated no round (every round was skipped); see rounds.jsonl", file=sys.stderr
        )
        return 1
    result = json.loads(summary.read_text())
    problem = error_skip_problem(result, len(rounds))
    if problem:
        print(f"fedmetanas: run {run_id}: {problem}", file=sys.stderr)
        return 1
    print(
        f"fedmetanas: run {run_id} {status}: final test accuracy {result['final_test_accuracy']:.4f}; results in "
        f"{results_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
