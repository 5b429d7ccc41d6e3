"""Flower + Ray cost of a real ``flwr run`` simulation: round-time overhead and peak memory.

    python -m benchmarks.framework                 # cifar10-cpu, 10 and 100 simulated clients
    python -m benchmarks.framework --rounds 3 --clients 10,100
    python -m benchmarks.framework --from-runs benchmarks/results/cifar10-cpu/*/   # finished runs

Each measurement is one ``fedmetanas run`` (``flwr run`` against the local SuperLink, Ray
simulation engine) of the ``cifar10-cpu`` preset in which 10 clients train per round: all of them
with 10 SuperNodes, ``fraction-train = 0.1`` with 100.

- **Overhead share** per round, from ``rounds.jsonl``: the round's wall time minus the server's own
  work (aggregation, masks, test-set evaluation: ``server-s``) minus the client computation on the
  Ray actors (``client-s-sum`` / number of actors, i.e. perfectly packed), over the round's wall
  time. What is left is Flower (messages, serialisation, SuperLink round trips) and Ray
  (scheduling, actor calls), plus any idle time from unequal client durations, which counts
  against the framework here. Round 1 also starts the actors and loads every client's data.
- **Peak memory**: the largest sum of proportional set sizes (PSS, so pages that Ray's workers share
  are counted once) over the SuperLink and all its descendant processes (the simulation process,
  Ray's GCS, raylet and workers), sampled every 0.25 s during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedmetanas_core.util.processes import descendants
from harness.cli import run_command

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "conf" / "cifar10-cpu.toml"  # every measurement's preset
PER_ROUND_TRAINERS = 10
RAY_ACTORS = min(os.cpu_count() or 1, PER_ROUND_TRAINERS)  # Ray runs one client per core (1 CPU each)


# ---------------------------------------------------------------------------------------------
# process-tree memory from /proc (Linux)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def superlink_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and "flower-superlink" in cmdline(int(p))]


def tree_pss_bytes(roots: list[int]) -> int:
    """Sum of PSS over ``roots`` and all their descendants (processes that vanish are skipped)."""
    total = 0
    for pid in [*roots, *descendants(roots)]:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples the process trees of the given roots (re-found each time) in a background thread."""

    def __init__(self, roots, interval: float = 0.25):
        self.roots, self.interval, self.peak = roots, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_bytes(self.roots()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------


def overhead_shares(rounds: list[dict[str, Any]], actors: int) -> list[float]:
    """Per round: (round-s - server-s - client-s-sum / actors) / round-s (see the module docstring)."""
    shares = []
    for r in rounds:
        outside = r["round-s"] - r.get("server-s", 0.0) - r["client-s-sum"] / actors
        shares.append(max(outside, 0.0) / r["round-s"])
    return shares


def whole_run_share(result: dict[str, Any]) -> float:
    """Time outside server and client work over all rounds, as a share of their summed wall time."""
    rounds = result["rounds"]
    return sum(r["overhead_share"] * r["round_s"] for r in rounds) / sum(r["round_s"] for r in rounds)


def measure(
    clients: int, rounds: int, out: Path, extra: list[str], trainers: int = PER_ROUND_TRAINERS
) -> dict[str, Any]:
    """One real run of ``clients`` simulated clients of which ``trainers`` train each round."""
    fraction = trainers / clients
    overrides = (
        f"num-server-rounds={rounds} fraction-train={fraction} fraction-evaluate={fraction} "
        f"min-available-nodes={clients} "
        f'min-train-nodes={trainers} results-dir="{out}" discrete-round=0'
    )  # discrete-round=0: the preset's lies beyond these few rounds; LATE sets its own
    cmd = run_command([str(PRESET), overrides, *extra], clients)
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    with PeakMemory(superlink_pids) as memory:
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        print(done.stdout[-4000:])
        raise SystemExit(f"the {clients}-client run failed (exit {done.returncode})")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    actors = RAY_ACTORS
    shares = overhead_shares(rows, actors)
    return {
        "clients": clients,
        "trainers": trainers,
        "fraction_train": fraction,
        "run_s": time.perf_counter() - started,
        "peak_pss_mib": memory.peak / 2**20,
        "actors": actors,
        "rounds": [
            {
                "round": r["round"],
                "round_s": r["round-s"],
                "server_s": r.get("server-s", 0.0),
                "client_s_sum": r["client-s-sum"],
                "images": r.get("client-images-mean", 0.0) * r.get("replies", 0),  # images the clients trained on
                "overhead_share": s,
            }
            for r, s in zip(rows, shares, strict=False)
        ],
        "overhead_share_after_round_1": statistics.mean(shares[1:]) if len(shares) > 1 else None,
    }


def round_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| clients (train per round) | round | round s | server s | client s (sum / actors) | Flower + Ray share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for r in res["rounds"]:
            lines.append(
                f"| {res['clients']} ({res['trainers']}) | {r['round']} | {r['round_s']:.1f} | {r['server_s']:.1f} "
                f"| {r['client_s_sum'] / res['actors']:.1f} | {100 * r['overhead_share']:.1f} % |"
            )
    return lines


def memory_table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| clients | peak memory (PSS, MiB) | mean Flower + Ray share, rounds 2+ |", "|---|---:|---:|"]
    for res in results:
        share = res["overhead_share_after_round_1"]
        lines.append(
            f"| {res['clients']} | {res['peak_pss_mib']:.0f} | {'-' if share is None else f'{100 * share:.1f} %'} |"
        )
    base = results[0]["peak_pss_mib"]
    for res in results[1:]:
        lines.append(
            f"\nPeak memory, {res['clients']} vs {results[0]['clients']} simulated clients: "
            f"**{res['peak_pss_mib'] / base:.2f} x**"
        )
    return lines


# late rounds: the cell is discrete after round 1 (one op per edge), so client work per round is smallest
LATE = "warmup-rounds=0 discrete-round=1"


def run(clients: list[int], rounds: int, extra: list[str], log=print) -> list[str]:
    results = []
    with tempfile.TemporaryDirectory(prefix="fedmetanas-framework-") as tmp:
        for n in clients:
            log(f"[framework] {n} simulated clients, {rounds} rounds ...")
            results.append(measure(n, rounds, Path(tmp) / f"clients-{n}", extra))
        log(f"[framework] {clients[0]} simulated clients, {rounds} rounds, discrete cell from round 2 ...")
        late = measure(clients[0], rounds, Path(tmp) / "late", extra + [LATE])
    lines = [
        f"### Flower + Ray: `cifar10-cpu`, real `flwr run` simulations ({rounds} rounds, {PER_ROUND_TRAINERS} "
        f"clients train per round)",
        "",
        "Early rounds (the preset's warm-up: every op of the supernet runs):",
        "",
        *round_table(results),
        "",
        *memory_table(results),
        "",
        f"Late rounds (`{LATE}`: from round 2 on the supernet is the discrete cell, the cheapest client work per "
        f"round):",
        "",
        *round_table([late]),
        "",
        f"Share of all {rounds} rounds' wall time (round 1 included: Ray actors start and every client loads its "
        f"data): "
        + ", ".join(f"{r['clients']} clients {100 * whole_run_share(r):.1f} %" for r in results)
        + f"; late rounds, {late['clients']} clients {100 * whole_run_share(late):.1f} %.",
        "",
    ]
    log("\n".join(lines))
    return lines


def from_runs(dirs: list[Path], actors: int) -> list[str]:
    """The same shares for finished runs (their rounds.jsonl), e.g. a whole comparison run."""
    lines = [
        "| run | rounds | Flower + Ray share, all rounds | rounds 2+ | round 1 | server share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for d in dirs:
        rows = [json.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines() if line.strip()]
        shares = overhead_shares(rows, actors)
        result = {
            "rounds": [{"round_s": r["round-s"], "overhead_share": sh} for r, sh in zip(rows, shares, strict=False)]
        }
        later = {"rounds": result["rounds"][1:]} if len(rows) > 1 else result
        server = sum(r.get("server-s", 0.0) for r in rows) / sum(r["round-s"] for r in rows)
        lines.append(
            f"| `{d}` | {len(rows)} | {100 * whole_run_share(result):.1f} % | {100 * whole_run_share(later):.1f} % "
            f"| {100 * shares[0]:.1f} % | {100 * server:.1f} % |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="10,100", help="comma-separated numbers of simulated clients")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-c", "--run-config", action="append", default=[], help="extra overrides")
    ap.add_argument(
        "--from-runs", nargs="*", type=Path, help="only report the shares of these finished runs' rounds.jsonl"
    )
    ap.add_argument("--actors", type=int, default=RAY_ACTORS, help="Ray actors of those runs")
    args = ap.parse_args(argv)
    if args.from_runs:
        print("\n".join(from_runs(args.from_runs, args.actors)))
        return 0
    run([int(c) for c in args.clients.split(",")], args.rounds, args.run_config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
