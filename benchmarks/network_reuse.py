"""What reusing a node's network between rounds saves: the same run, in process, with the network
built fresh every round (as before) and reused (``client_round.NETWORKS``), interleaved.

    python -m benchmarks.network_reuse                       # the default run, 2 pairs
    python -m benchmarks.network_reuse -c conf/cifar10-cpu.toml -c 'num-server-rounds=12' --pairs 1

Both arms compute the same thing, so their accuracies must match to the digit (the script says so
when they do not). Times: the whole in-process run (``benchmarks.inprocess``: no Flower or Ray
start-up), and the clients' own seconds summed over rounds, split by whether the cell was decided
when the round began (``bound.phase_of``: supernet against discrete-cell rounds). Medians over the
pairs; the arms alternate in order, so load on a shared machine hits both alike, and the ratio is the reliable part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import fedmetanas_core.federation.client_round as client_round
from benchmarks.bound import phase_of
from benchmarks.inprocess import run
from fedmetanas_core.util.lru import LruCache

ARMS = ("rebuild", "reuse")


BUILD = client_round.build_model


def one_run(arm: str, items: list[str], run_id: int) -> dict:
    """One in-process run of ``items`` with the network built every round or reused; also the CPU
    seconds the clients spent getting their network (``build_model``: a build, or a cache hit)."""
    client_round.NETWORKS = LruCache(0 if arm == "rebuild" else 4)
    spent = [0.0]

    def timed_build(*args, **kwargs):
        t0 = time.process_time()
        try:
            return BUILD(*args, **kwargs)
        finally:
            spent[0] += time.process_time() - t0

    client_round.build_model = timed_build
    try:
        with tempfile.TemporaryDirectory() as tmp:
            summary = run(items, 10, Path(tmp), run_id)
            rows = [json.loads(line) for line in (Path(tmp) / "rounds.jsonl").read_text().splitlines()]
    finally:
        client_round.build_model = BUILD
    by_phase = {"supernet": 0.0, "discrete": 0.0}
    for previous, row in zip([{}, *rows], rows, strict=False):  # a round trains under the last round's masks
        phase = "discrete" if phase_of(previous) == "discrete cell" else "supernet"
        by_phase[phase] += row.get("client-s-sum", 0.0)
    return {
        "arm": arm,
        "wall_s": summary["inprocess_wall_s"],
        "client_s_supernet": round(by_phase["supernet"], 2),
        "client_s_discrete": round(by_phase["discrete"], 2),
        "network_cpu_s": round(spent[0], 3),
        "final_test_accuracy": summary["final_test_accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--run-config", action="append", default=[], help="preset file or 'key=value ...'")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every run and the medians here")
    args = parser.parse_args(argv)
    runs = []
    for pair in range(args.pairs):
        for arm in ARMS if pair % 2 == 0 else ARMS[::-1]:
            runs.append(one_run(arm, args.run_config, len(runs) + 1))
            print(json.dumps(runs[-1]), flush=True)
    medians = {
        arm: {
            k: statistics.median(r[k] for r in runs if r["arm"] == arm)
            for k in ("wall_s", "client_s_supernet", "client_s_discrete", "network_cpu_s")
        }
        for arm in ARMS
    }
    same = len({r["final_test_accuracy"] for r in runs}) == 1
    report = {
        "run_config": args.run_config,
        "runs": runs,
        "medians": medians,
        "reuse_over_rebuild": {
            k: round(medians["reuse"][k] / medians["rebuild"][k], 3) for k in medians["reuse"] if medians["rebuild"][k]
        },
        "same_accuracy": same,
    }
    print(json.dumps({k: report[k] for k in ("medians", "reuse_over_rebuild", "same_accuracy")}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
