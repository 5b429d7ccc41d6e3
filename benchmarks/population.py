"""Cross-device population: does a round cost more when the federation is 10x larger?

    python -m benchmarks.population -c 'data-dir="/abs/path/cifar10"'          # 100 vs 1,000 clients
    python -m benchmarks.population --populations 100,1000 --sampled 30 --rounds 5 -c ...

Each population is one real ``fedmetanas run`` (``flwr run``, local SuperLink, Ray simulation
engine) of the ``cifar10-cpu`` preset over the whole CIFAR-10 training split (50,000 images) in
``N`` Dirichlet partitions, with ``fraction-train = fraction-evaluate = sampled / N``, so the same
number of clients train per round whatever the population. Measured in the same benchmark run:

- **per-round wall time**: median ``round-s`` of rounds 2.. (round 1 also starts the Ray actors and
  partitions the data), and the server's own share (``server-s``: aggregation, masks, test set);
- **peak memory**: the largest sum of PSS (shared pages counted once) over this run's SuperLink and
  all its descendants (simulation process, Ray's GCS, raylet, workers), sampled every 0.25 s.

Every run gets its own ``FLWR_HOME`` and API ports, and its SuperLink is stopped by PID afterwards,
so other jobs on the machine are neither measured nor disturbed. Writes ``population.json`` and
``population.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.framework import PeakMemory, cmdline
from fedmetanas_core.run.outputs import machine_description
from fedmetanas_core.util.atomic import atomic_write_text
from fedmetanas_core.util.processes import stop_pids
from harness.cli import run_command

ROOT = Path(__file__).resolve().parents[1]
LIGHT = "local-meta-iters=4"  # little client work per round: any cost of the population shows more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def superlinks_of(control_port: int) -> list[int]:
    """This run's local SuperLink(s), found by the Control API port given to the run: ``fedmetanas run``
    keeps the caller's ports but gives its SuperLink a FLWR_HOME of its own."""
    address = f"127.0.0.1:{control_port}"
    return [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and "flower-superlink" in (c := cmdline(int(p))) and address in c.split()
    ]


def measure(population: int, sampled: int, rounds: int, out: Path, extra: list[str]) -> dict[str, Any]:
    fraction = sampled / population
    overrides = (
        f"num-partitions={population} fraction-train={fraction} fraction-evaluate={fraction} "
        f"min-train-nodes={sampled} min-available-nodes={population} num-server-rounds={rounds} "
        f'train-subset=0 results-dir="{out}"'
    )
    cmd = run_command([str(ROOT / "conf" / "cifar10-cpu.toml"), overrides, LIGHT, *extra], population)
    control = free_port()
    env = {
        **os.environ,
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
    }
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    seen: set[int] = set()

    def roots() -> list[int]:
        pids = superlinks_of(control)
        seen.update(pids)
        return pids

    try:
        with PeakMemory(roots) as memory:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        stop_pids(sorted(seen | set(superlinks_of(control))), grace_s=20)
    if done.returncode != 0:
        print(done.stdout[-4000:])
        raise SystemExit(f"the {population}-client run failed (exit {done.returncode})")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    later = rows[1:] or rows
    return {
        "population": population,
        "sampled_per_round": sampled,
        "replies_per_round": [r["replies"] for r in rows],
        "run_s": time.perf_counter() - started,
        "peak_pss_mib": memory.peak / 2**20,
        "round_1_s": rows[0]["round-s"],
        "round_s_median": statistics.median(r["round-s"] for r in later),
        "server_s_median": statistics.median(r["server-s"] for r in later),
        "rounds": [
            {k: r.get(k) for k in ("round", "round-s", "server-s", "client-s-sum", "replies", "bytes-sent")}
            for r in rows
        ],
    }


def table(results: list[dict[str, Any]]) -> list[str]:
    base = results[0]
    lines = [
        "| population | clients per round | round 1 s | round s (median, rounds 2+) | server s (median, rounds 2+) "
        "| peak PSS MiB | round time vs first | peak memory vs first |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['population']} | {r['sampled_per_round']} | {r['round_1_s']:.1f} | {r['round_s_median']:.1f} | "
            f"{r['server_s_median']:.2f} "
            f"| {r['peak_pss_mib']:.0f} | {r['round_s_median'] / base['round_s_median']:.2f} x | "
            f"{r['peak_pss_mib'] / base['peak_pss_mib']:.2f} x |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--populations", default="100,1000", help="comma-separated simulated populations, the baseline first"
    )
    ap.add_argument("--sampled", type=int, default=30, help="clients that train per round, in every population")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "population")
    ap.add_argument("-c", "--run-config", action="append", default=[], help="extra overrides (data-dir, ...)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(p) for p in args.populations.split(",")):
        print(f"[population] {n} simulated clients, {args.sampled} per round, {args.rounds} rounds", flush=True)
        results.append(measure(n, args.sampled, args.rounds, args.out / f"clients-{n}", args.run_config))
    doc = {"machine": machine_description(), "light": LIGHT, "overrides": args.run_config, "results": results}
    atomic_write_text(args.out / "population.json", json.dumps(doc, indent=2) + "\n")
    lines = table(results)
    atomic_write_text(args.out / "population.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
