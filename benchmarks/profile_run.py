"""Where a whole ``fedmetanas run`` spends its wall time, from the command to its exit.

    python -m benchmarks.profile_run                        # the default run (digits), seed 0
    python -m benchmarks.profile_run -c conf/cifar10-cpu.toml --runs 1
    python -m benchmarks.profile_run --plain-flwr -c "seed=1"  # the same run through `flwr run . --stream`
    python -m benchmarks.profile_run -c "seed=0" --results-dir benchmarks/results/default-run/seed-0 \
        --json benchmarks/results/default-run/seed-0/command-time.json   # the README's default run

Runs the real command (local SuperLink, Ray simulation engine) and splits its time with the
timestamps the run writes: each rounds.jsonl row has ``round-started-at`` (unix time) and
``first-client-start-s`` (when the first client's ``train`` began, from the replies' ``started-at``).

- **start-up**: the command's start to the first client's first training step (CLI, SuperLink,
  FAB install, ServerApp process, data, Ray and its actors, the first message);
- **round 1** from that step on; then **rounds by phase** (full supernet: nothing pruned yet;
  pruning; discrete cell), each split into client work per core (``client-s-sum`` / cores, as if
  perfectly packed), the server's own work (``server-s``: aggregation, masks, test-set evaluation)
  and the rest (Flower messages and record conversion, Ray scheduling, waiting for the slowest client);
- **end of run**: the last round's end to the command's exit (the deployed network's evaluation,
  personalization round, export and its latency measurement, figures, ``flwr run`` closing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bound import phase_of
from fedmetanas_core.run.outputs import machine_description
from harness.cli import PrivateSuperLink, flwr_env, run_command

ROOT = Path(__file__).resolve().parents[1]


def plain_flwr_command(items: list[str], clients: int = 10) -> list[str]:
    """The same run through Flower's own CLI (``flwr run . --stream``), as docs/configuration.md
    shows it: key=value items only (no preset files, which ``fedmetanas run`` resolves)."""
    flwr = str(Path(sys.executable).with_name("flwr"))
    federation = f"num-supernodes={clients} client-resources-num-cpus=1"
    return [flwr, "run", str(ROOT), "--stream", "--federation-config", federation, "--run-config", " ".join(items)]


def profile(items: list[str], out: Path, cores: int, plain_flwr: bool = False) -> dict:
    items = [*items, f"results-dir={json.dumps(str(out))}"]
    if plain_flwr:  # its own local SuperLink (FLWR_HOME, ports), stopped after the command's exit
        private = PrivateSuperLink(None, flwr_env(dict(os.environ)))
        t0 = time.time()
        try:
            proc = subprocess.run(plain_flwr_command(items), cwd=ROOT, capture_output=True, text=True, env=private.env)
            t_exit = time.time()
        finally:
            private.stop(keep_home=False)
    else:
        t0 = time.time()
        proc = subprocess.run(run_command(items), cwd=ROOT, capture_output=True, text=True)
        t_exit = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    first_step = rows[0]["round-started-at"] + rows[0]["first-client-start-s"]
    last_end = rows[-1]["round-started-at"] + rows[-1]["round-s"]
    parts = {
        "start-up": first_step - t0,
        "round 1 from the first step": rows[0]["round-s"] - rows[0]["first-client-start-s"],
    }
    phases: dict[str, dict[str, float]] = {}
    for previous, r in zip(rows, rows[1:], strict=False):
        p = phases.setdefault(
            phase_of(previous), {"rounds": 0, "wall": 0.0, "client": 0.0, "server": 0.0, "reply-wait": 0.0}
        )
        p["rounds"] += 1
        p["wall"] += r["round-s"]
        p["client"] += r["client-s-sum"] / cores
        p["server"] += r["server-s"]
        if r.get("replies-in-s") is not None and r.get("last-client-end-s") is not None:
            p["reply-wait"] += r["replies-in-s"] - r["last-client-end-s"]  # the last reply's trip and pulls
    parts.update({f"rounds 2+: {k}": v["wall"] for k, v in phases.items()})
    parts["end of run"] = t_exit - last_end
    return {
        "total": t_exit - t0,
        "parts": parts,
        "phases": phases,
        "accuracy": summary["final_test_accuracy"],
        "machine": machine_description(),
        "round1": {k: rows[0][k] for k in ("round-s", "client-s-sum", "server-s", "first-client-start-s")},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--run-config", action="append", default=[], help="preset file or 'key=value ...'")
    ap.add_argument("--runs", type=int, default=1, help="repeat the command; medians are reported")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the simulated clients share")
    ap.add_argument("--json", type=Path, default=None, help="write every run's split here")
    ap.add_argument(
        "--keep", type=Path, default=None, help="keep each run's results in KEEP/run-N (else a temporary folder)"
    )
    ap.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="with one run: write its results here, as `fedmetanas run -c results-dir=...` would",
    )
    ap.add_argument(
        "--plain-flwr",
        action="store_true",
        help="time `flwr run . --stream` (key=value items only) instead of `fedmetanas run`",
    )
    args = ap.parse_args(argv)
    if args.results_dir is not None and (args.runs != 1 or args.keep is not None):
        ap.error("--results-dir is for one run (--runs 1), without --keep")
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            if args.results_dir is not None:
                out = args.results_dir.resolve()
            else:
                out = args.keep / f"run-{i + 1}" if args.keep else Path(tmp) / "run"
            results.append(profile(args.run_config, out, args.cores, args.plain_flwr))
        print(f"run {i + 1}: {results[-1]['total']:.1f} s, accuracy {results[-1]['accuracy']:.4f}", flush=True)
    med = statistics.median
    print(f"\n| part | wall s (median of {len(results)}) | share |\n|---|---:|---:|")
    total = med(r["total"] for r in results)
    for k in results[0]["parts"]:
        v = med(r["parts"].get(k, 0.0) for r in results)
        print(f"| {k} | {v:.1f} | {100 * v / total:.0f} % |")
    print(f"| **whole command** | **{total:.1f}** | |")
    print(
        "\n| rounds 2+ by phase | rounds | wall s | client work per core s | server s | rest (Flower, Ray, waiting) s "
        "| of which: last client's end to its reply at the server s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    fields = ("rounds", "wall", "client", "server", "reply-wait")
    for k in results[0]["phases"]:
        p = {f: med(r["phases"].get(k, {}).get(f, 0.0) for r in results) for f in fields}
        print(
            f"| {k} | {p['rounds']:.0f} | {p['wall']:.1f} | {p['client']:.1f} | {p['server']:.1f} | "
            f"{p['wall'] - p['client'] - p['server']:.1f} | {p['reply-wait']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
