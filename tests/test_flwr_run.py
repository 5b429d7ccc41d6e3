"""The README's main command path: `fedmetanas run` -> `flwr run` -> a real local SuperLink (simulation).

Runs on its own FLWR_HOME and ports, and stops the SuperLink it started by PID at the end.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # `flwr run` and a real local SuperLink


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def flower_env(tmp_path):
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
    }
    yield env
    pids = subprocess.run(["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True, text=True).stdout.split()
    for pid in pids:  # the detached local SuperLink (its flower-superexec child dies with it)
        os.kill(int(pid), signal.SIGTERM)
    deadline = time.time() + 10
    while pids and time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.2)


def _fedmetanas_run(env, *config: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "harness.cli", "run", "--num-supernodes", "3"]
    for c in config:
        cmd += ["-c", c]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_fedmetanas_run_completes_and_fails_loudly(flower_env, tmp_path):
    out = tmp_path / "out"
    done = _fedmetanas_run(
        flower_env, f'num-server-rounds=2 local-meta-iters=2 min-available-nodes=3 results-dir="{out}"'
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[search 2/2]" in done.stdout and "finished:completed" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 3 and summary["rounds"] == 2

    # a run that fails inside the ServerApp: `flwr run --stream` exits 0, `fedmetanas run` must not
    bad = tmp_path / "bad_genotype.yaml"
    bad.write_text("normal: [[{op: sep_conv_3x3}]]\n")  # no 'input', no 'reduce'
    failed = _fedmetanas_run(
        flower_env,
        f'method="fedavg" fedavg-genotype="{bad}" num-server-rounds=1 min-available-nodes=3 '
        f'results-dir="{tmp_path / "fail"}"',
    )
    assert failed.returncode != 0
    assert "did not complete" in failed.stderr
