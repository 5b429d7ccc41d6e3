"""Checks of the Ray facts that ``fedmetanas run --ray-address`` and docs/scale.md rely on.

    python -m benchmarks.ray_checks               # attach rules and what actors see (~1 min)
    python -m benchmarks.ray_checks --superlink   # plus: a running SuperLink ignores RAY_ADDRESS (~3 min more)

It starts a private 2-node Ray cluster on 127.0.0.1 (``tests/ray_cluster.py``: own temp dir and
ports, every process stopped by PID, never ``ray stop``) and prints one JSON object:

- ``init_args_refused``: ``ray.init(address=..., num_cpus=1)`` fails when it attaches (so Flower's
  ``init-args-num-cpus`` must not be set with a cluster);
- ``actor_cwd`` / ``actor_sees_driver_env``: a task on the cluster runs in the directory where
  ``ray start`` ran, not in the driver's, and does not see a variable set only in the driver's
  environment;
- ``running_superlink_used_cluster`` (with ``--superlink``): a plain ``flwr run`` with
  ``RAY_ADDRESS`` set, against a local SuperLink that was started without it, puts no actor on
  the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ray_cluster import RayCluster  # noqa: E402

from harness.cli import flwr_env  # noqa: E402

TINY = (
    "num-server-rounds=1 local-meta-iters=1 min-available-nodes=2 min-train-nodes=2 batch-size=16 init-channels=4 "
    "train-subset=240 test-subset=120 personalize-steps=2 checkpoint=false torch-threads=1"
)

PROBE = """
import os
@ray.remote(num_cpus=1)
def probe():
    return os.getcwd(), os.environ.get("FEDMETANAS_PROBE")
print(json.dumps({"driver_cwd": os.getcwd(), "task": ray.get(probe.remote())}))
"""


def _running_superlink_check(cluster: RayCluster, scratch: Path) -> dict:
    """Start a local SuperLink without RAY_ADDRESS (``flwr ls`` does), then ``flwr run`` with it."""
    home = scratch / "flwr-home"
    env = flwr_env(
        {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_HOME", "FLWR_LOCAL_", "RAY_ADDRESS"))}
    )
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(cluster.ports.one()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(cluster.ports.one()),
        }
    )
    before = {a["ActorID"] for a in cluster.actors()}
    try:
        subprocess.run(["flwr", "ls"], capture_output=True, text=True, env=env, cwd=scratch, timeout=120)
        env["RAY_ADDRESS"] = cluster.address
        started = time.time()
        done = subprocess.run(
            [
                "flwr",
                "run",
                str(ROOT),
                "local",
                "--stream",
                "--federation-config",
                "num-supernodes=2 client-resources-num-cpus=1",
                "--run-config",
                f'{TINY} results-dir="{scratch / "out"}"',
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=scratch,
            timeout=900,
        )
        new = [a for a in cluster.actors() if a["ActorID"] not in before]
        return {
            "running_superlink_run_completed": (scratch / "out" / "summary.json").is_file(),
            "running_superlink_run_s": round(time.time() - started, 1),
            "running_superlink_used_cluster": bool(new),
            "flwr_run_rc": done.returncode,
        }
    finally:  # the SuperLink (its command line holds our FLWR_HOME); its superexec child dies with it
        for pid in subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_checks", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--superlink", action="store_true", help="also check that a running SuperLink ignores RAY_ADDRESS"
    )
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="fedmetanas-raychecks-"))
    started = time.time()
    cluster = RayCluster(num_nodes=2, cpus_per_node=1).start()
    result: dict = {"cluster_up_s": round(time.time() - started, 1), "ray_start_cwd": cluster.temp_dir}
    try:
        attach = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={cluster.address!r}, num_cpus=1)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        result["init_args_refused"] = attach.returncode != 0
        result["init_args_error"] = (attach.stderr.strip().splitlines() or [""])[-1]
        os.environ["FEDMETANAS_PROBE"] = (
            "set-in-driver-only"  # the query driver inherits it; the cluster's workers do not
        )
        probe = cluster.query(PROBE)
        os.environ.pop("FEDMETANAS_PROBE")
        result["driver_cwd"] = probe["driver_cwd"]
        result["actor_cwd"], env_value = probe["task"]
        result["actor_sees_driver_env"] = env_value is not None
        if args.superlink:
            result.update(_running_superlink_check(cluster, scratch))
    finally:
        result["sigkilled_at_stop"] = cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
