"""`fedmetanas run --ray-address`: the flags' validation, and a real 2-node Ray cluster on 127.0.0.1.

The cluster tests are opt-in (``FEDMETANAS_SLOW_TESTS=1``): two Ray nodes and two one-round runs
(``HOST:PORT`` and ``ray://``) take about three minutes on a 2-core machine. It starts every Ray process
itself (``tests/ray_cluster.py``) and stops exactly those by PID, never with ``ray stop``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import cli

SLOW = os.environ.get("FEDMETANAS_SLOW_TESTS") == "1"

# --- 1. the flags are validated before anything starts --------------------------------------------


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--ray-address", "headnode"], "--ray-address"),  # no port
        (["--ray-address", "10.0.0.1:70000"], "--ray-address"),  # port out of range
        (["--ray-address", "http://10.0.0.1:6379"], "--ray-address"),  # not a Ray scheme
        (["--ray-address", "ray://:10001"], "--ray-address"),  # no host
        (["--ray-address", "10.0.0.1:6379 extra"], "--ray-address"),
        (["--gpus-per-client", "0"], "--gpus-per-client"),
        (["--gpus-per-client", "-0.5"], "--gpus-per-client"),
        (["--gpus-per-client", "inf"], "--gpus-per-client"),
        (["--connection", "deploy", "--ray-address", "10.0.0.1:6379"], "--ray-address"),
        (["--connection", "deploy", "--gpus-per-client", "1"], "--gpus-per-client"),
        (["--cpus-per-client", "0"], "--cpus-per-client"),
        (["--num-supernodes", "0"], "--num-supernodes"),
    ],
)
def test_bad_flags_get_one_line_naming_the_flag_and_exit_2(flags, flag, monkeypatch, capsys):
    def no_flwr(*args, **kwargs):
        raise AssertionError(f"flwr was started despite a bad flag: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_flwr)
    assert cli.main(["run", *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"'{flag}'" in err[0] and "invalid" in err[0], err


@pytest.mark.parametrize(
    "address", ["10.0.0.1:6379", "head-node.example.org:6379", "ray://10.0.0.1:10001", "ray://[::1]:10001"]
)
def test_ray_address_forms_are_accepted(address):
    assert cli.check_ray_address(address) == address


def test_a_busy_superlink_port_is_refused_with_ray_address(monkeypatch, capsys):
    """A SuperLink already on the port would be reused with its own environment (no RAY_ADDRESS)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(busy.getsockname()[1]))
        assert cli.main(["run", "--ray-address", "127.0.0.1:6379"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" in err[0], err
    monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39o91")
    assert cli.main(["run", "--ray-address", "127.0.0.1:6379"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'FLWR_LOCAL_SUPERLINK_HTTP_API_PORT'" in err[0] and "invalid" in err[0], err


def test_a_busy_caller_set_port_is_refused_for_any_local_run(monkeypatch, capsys):
    """Every local run starts its own SuperLink, on the caller's ports when set: a busy one is a
    one-line error before anything starts, not a run that fails at its SuperLink's start."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("FLWR_LOCAL_CONTROL_API_PORT", str(busy.getsockname()[1]))
        assert cli.main(["run", "-c", "num-server-rounds=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'FLWR_LOCAL_CONTROL_API_PORT'" in err[0] and "in use" in err[0], err


REAL_POPEN = subprocess.Popen


class RecordingFlwrRun:
    """Stands in for the `flwr run` process only, to record the command and environment it gets
    (the cluster test below runs the real one); other commands (pgrep) run for real."""

    calls: list = []

    def __new__(cls, cmd, **kwargs):
        return super().__new__(cls) if cmd[0] == "flwr" else REAL_POPEN(cmd, **kwargs)

    def __init__(self, cmd, **kwargs):
        RecordingFlwrRun.calls.append((cmd, kwargs["env"]))
        self.stdout, self.returncode = iter([]), 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_ray_address_reaches_a_private_superlink_and_gpus_the_federation_config(tmp_path, monkeypatch):
    RecordingFlwrRun.calls = []
    monkeypatch.setattr(subprocess, "Popen", RecordingFlwrRun)
    monkeypatch.delenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", raising=False)
    args = [
        "run",
        "--ray-address",
        "ray://10.0.0.1:10001",
        "--gpus-per-client",
        "0.25",
        "-c",
        f'results-dir="{tmp_path}"',
    ]
    assert cli.main(args) == 1  # the recorder "fails", so the private FLWR_HOME is kept for its log
    ((cmd, env),) = RecordingFlwrRun.calls
    federation = cmd[cmd.index("--federation-config") + 1]
    assert "client-resources-num-gpus=0.25" in federation and "init-args" not in federation
    assert env["RAY_ADDRESS"] == "ray://10.0.0.1:10001"
    home = Path(env["FLWR_HOME"])
    assert home != Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) and home.is_dir()
    assert env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] != "39091"
    home.rmdir()
    # without --ray-address: no RAY_ADDRESS added, no GPU key unless asked, and still a private SuperLink
    # (a local SuperLink left running on the default ports by another checkout would run its own code)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    RecordingFlwrRun.calls = []
    assert cli.main(["run", "-c", f'results-dir="{tmp_path}"']) == 1
    ((cmd, env),) = RecordingFlwrRun.calls
    assert "RAY_ADDRESS" not in env and "num-gpus" not in cmd[cmd.index("--federation-config") + 1]
    private = Path(env["FLWR_HOME"])
    assert private not in (home, Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))) and private.is_dir()
    assert {env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], env["FLWR_LOCAL_CONTROL_API_PORT"]}.isdisjoint(
        {"39091", "39093"}
    )
    private.rmdir()


# --- 2. a real 2-node Ray cluster -------------------------------------------------------------------

TINY = (
    "num-server-rounds=1 local-meta-iters=1 min-available-nodes=2 min-train-nodes=2 batch-size=16 init-channels=4 "
    "train-subset=240 test-subset=120 personalize-steps=2 checkpoint=false torch-threads=1"
)
slow = pytest.mark.skipif(not SLOW, reason="starts a 2-node Ray cluster (~3 min in all); set FEDMETANAS_SLOW_TESTS=1")


@pytest.fixture(scope="module")
def cluster():
    if not sys.platform.startswith("linux"):
        pytest.skip("tracks Ray's processes through /proc")
    sys.path.insert(0, str(Path(__file__).parent))
    from ray_cluster import RayCluster

    started = time.time()
    ray_cluster = RayCluster(num_nodes=2, cpus_per_node=1).start()
    print(f"\ncluster up in {time.time() - started:.1f} s")
    yield ray_cluster
    started = time.time()
    killed = ray_cluster.stop()
    print(f"cluster stopped in {time.time() - started:.1f} s; SIGKILLed {killed}")
    assert not ray_cluster.still_ours()


@slow
@pytest.mark.slow
@pytest.mark.parametrize("form", ["host_port", "ray_client"])
def test_run_on_a_two_node_ray_cluster(cluster, form, tmp_path):
    """One round; ClientApp actors of this run on both nodes; the private SuperLink stopped."""
    address = cluster.address if form == "host_port" else cluster.client_address
    before = {a["ActorID"] for a in cluster.actors()}
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_HOME", "FLWR_LOCAL_", "RAY_ADDRESS"))}
    for var in ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT"):
        env[var] = str(cluster.ports.one())  # the machine's port plan, when FEDMETANAS_TEST_PORTS is set
    cmd = [sys.executable, "-m", "harness.cli", "run", "--ray-address", address]
    cmd += ["--num-supernodes", "2", "--cpus-per-client", "1", "-c", f'{TINY} results-dir="{out}"']
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    cluster.track()
    print(f"{form}: fedmetanas run took {time.time() - started:.1f} s")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "finished:completed" in done.stdout and (out / "summary.json").is_file()
    assert json.loads((out / "summary.json").read_text())["num_clients"] == 2

    nodes = cluster.node_ids()
    actors = [a for a in cluster.actors() if a["ActorID"] not in before]  # this run's
    assert len(nodes) == 2
    # Flower sized its pool from the cluster (1 CPU per client, 1 CPU per node): one actor per node
    assert {a["Address"]["NodeID"] for a in actors} == nodes, actors
    assert all(a["Pid"] and a["StartTime"] for a in actors)  # each was scheduled and started

    # the run's private SuperLink is gone, and so is its FLWR_HOME (the run succeeded)
    line = next(line for line in done.stdout.splitlines() if "private local SuperLink" in line)
    home = line.split("FLWR_HOME=", 1)[1].rstrip(")")
    assert not Path(home).exists() and not cli.listening(int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]))
    assert not subprocess.run(["pgrep", "-f", home], capture_output=True, text=True).stdout.strip()
