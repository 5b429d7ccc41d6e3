"""A real multi-node Ray cluster on 127.0.0.1, owned by the test that starts it.

Every node is a ``ray start --block`` child in its own session, so this module knows every process
Ray spawns for it (the session plus the process tree below each ``ray start``) and stops exactly
those by PID. It never runs ``ray stop``, which would stop every Ray instance on the machine.

Every port a node opens is chosen here, so two nodes on one host (and any other Ray on the
machine) do not collide; the temp dir is short because Ray's Unix socket paths live in it
(Linux limits them to 107 bytes). Linux only (/proc).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmetanas_core.util.processes import process_table

# ports a node opens besides its worker-port range (the head adds --port and --ray-client-server-port)
NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)
WORKER_PORTS_PER_NODE = 16


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PortPool:
    """Free ports from ``FEDMETANAS_TEST_PORTS`` ("LOW-HIGH", for machines where each job has its
    own range), else from the kernel's ephemeral range."""

    def __init__(self) -> None:
        spec = os.environ.get("FEDMETANAS_TEST_PORTS", "")
        low, _, high = spec.partition("-")
        self._range = iter(range(int(low), int(high) + 1)) if spec else None
        self._given: set[int] = set()

    def one(self) -> int:
        if self._range is None:
            while True:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                if port not in self._given:
                    break
        else:
            port = next(p for p in self._range if p not in self._given and _port_free(p))
        self._given.add(port)
        return port

    def block(self, n: int) -> tuple[int, int]:
        """n consecutive free ports (a node's worker ports)."""
        while True:
            first = self.one()
            ports = list(range(first, first + n))
            if all(p not in self._given and _port_free(p) for p in ports[1:]) and ports[-1] < 65536:
                self._given.update(ports)
                return ports[0], ports[-1]


@dataclass
class RayCluster:
    """``RayCluster(num_nodes=2).start()`` ... ``.stop()``; ``address`` is the head's GCS address."""

    num_nodes: int = 2
    cpus_per_node: int = 1
    object_store_bytes: int = 80 * 1024**2
    ports: PortPool = field(default_factory=PortPool)
    temp_dir: str = ""
    address: str = ""
    client_address: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)
    _seen: dict[int, str] = field(default_factory=dict)  # pid -> start time, of every process we own

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        return env

    def _node_args(self) -> list[str]:
        args = []
        for flag in NODE_PORT_FLAGS:
            args += [flag, str(self.ports.one())]
        low, high = self.ports.block(WORKER_PORTS_PER_NODE)
        args += ["--min-worker-port", str(low), "--max-worker-port", str(high)]
        args += ["--num-cpus", str(self.cpus_per_node), "--num-gpus", "0"]
        args += ["--object-store-memory", str(self.object_store_bytes), "--node-ip-address", "127.0.0.1"]
        return args + ["--disable-usage-stats", "--block"]

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(Path(self.temp_dir) / log, "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self._env(),
            start_new_session=True,
            cwd=self.temp_dir,
        )
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 90.0) -> RayCluster:
        self.temp_dir = tempfile.mkdtemp(prefix="fmr", dir="/tmp")  # short: Unix socket paths
        gcs_port, client_port = self.ports.one(), self.ports.one()
        self.address = f"127.0.0.1:{gcs_port}"
        self.client_address = f"ray://127.0.0.1:{client_port}"
        head = ["--head", "--port", str(gcs_port), "--ray-client-server-port", str(client_port)]
        # the head still runs a minimal dashboard process (usage stats) that binds --dashboard-port
        head += ["--temp-dir", self.temp_dir, "--include-dashboard", "false", "--dashboard-port", str(self.ports.one())]
        self._spawn(head + self._node_args(), "head.log")
        try:
            self.wait_for_nodes(1, timeout)
            for i in range(1, self.num_nodes):
                self._spawn(["--address", self.address, *self._node_args()], f"worker{i}.log")
            self.wait_for_nodes(self.num_nodes, timeout)
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def query(self, code: str, timeout: float = 60.0) -> object:
        """Run ``code`` in a short-lived driver attached to this cluster; it must print one JSON
        value last. A separate process keeps ``ray.init`` out of the test process."""
        script = f"import json, ray\nray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False)\n"
        done = subprocess.run(
            [sys.executable, "-c", script + code], capture_output=True, text=True, env=self._env(), timeout=timeout
        )
        self.track()
        if done.returncode != 0:
            raise RuntimeError(f"driver failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> list[dict]:
        return self.query("print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))")

    def wait_for_nodes(self, n: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"ray start exited ({dead[0].returncode}); see logs in {self.temp_dir}")
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError):
                pass
            if time.time() > deadline:
                raise TimeoutError(f"{n} Ray nodes not up after {timeout:.0f} s; see logs in {self.temp_dir}")
            time.sleep(1.0)

    def track(self) -> None:
        """Remember every process in our sessions or below a ``ray start`` (called often, so short-lived
        children that re-parent to init are caught while they still have a known parent)."""
        table = process_table()
        roots = {p.pid for p in self.procs}
        owned = {pid for pid, info in table.items() if info.session in roots} | roots | set(self._seen)
        changed = True
        while changed:
            new = {pid for pid, info in table.items() if info.ppid in owned and pid not in owned}
            owned |= new
            changed = bool(new)
        for pid in owned:
            if pid in table and pid not in self._seen:
                self._seen[pid] = table[pid].start_ticks

    def actors(self, class_name: str = "ClientAppActor") -> list[dict]:
        """Ray's actor table (alive and dead), read through the GCS: no dashboard needed."""
        code = (
            "print(json.dumps([a for a in ray._private.state.actors().values() "
            f"if a['ActorClassName'] == {class_name!r}], default=str))"
        )
        return self.query(code)

    def node_ids(self) -> set[str]:
        return {n["NodeID"] for n in self.alive_nodes()}

    def still_ours(self) -> list[int]:
        table = process_table()
        return [pid for pid, start in self._seen.items() if pid in table and table[pid].start_ticks == start]

    def stop(self, grace: float = 15.0, keep_logs: bool = False) -> list[int]:
        """SIGTERM each ``ray start`` (it stops its node), then SIGKILL whatever of ours is left, and
        remove the temp dir (Ray's logs) unless ``keep_logs``. Returns the PIDs that needed SIGKILL."""
        self.track()
        for proc in reversed(self.procs):  # workers first, head last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and self.still_ours():
            for proc in self.procs:
                proc.poll()  # reap
            time.sleep(0.3)
        left = self.still_ours()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if not keep_logs and self.temp_dir and not self.still_ours():
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left
