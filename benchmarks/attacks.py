"""Attacks on the federated search: each attack x each aggregation strategy, with and without the
architecture-logit defence, against the attack-free run. Writes JSON and a markdown table.

    nice -n 10 python -m benchmarks.attacks --out benchmarks/results/attacks --jobs 2 [--seeds 0 1] [--only NAME ...]

Every run is the default digits FedMetaNAS config (10 clients, Dirichlet 0.5, 20 rounds) plus the
overrides in ``RUNS``; clients 0 and 1 attack in every round. A run is the real ServerApp loop
(``server_app.app.run_experiment``) with the real ClientApp handlers called in one process for
every node (``harness.local_grid.LocalGrid``): the same messages, records and code paths as a Flower
simulation, without Ray, so a 2-core machine can afford the grid. Each run goes to its own
process; finished runs (a ``summary.json`` in their folder) are not rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLIENTS = 10
ATTACKERS = "0,1"
ROBUST = {
    "FedAvg": {"strategy": "FedAvg"},
    "Krum": {"strategy": "Krum", "num-malicious-nodes": 2},
    "MultiKrum": {"strategy": "MultiKrum", "num-malicious-nodes": 2, "num-nodes-to-select": 8},
    "FedMedian": {"strategy": "FedMedian"},
    "FedTrimmedAvg": {"strategy": "FedTrimmedAvg", "trim-beta": 0.2},
}
ATTACKS = ("sign-flip", "alpha-poison")
DEFENCE = "median"  # the defence the grid measures for every strategy; others with --only


def _runs() -> dict[str, dict[str, Any]]:
    """name -> run-config overrides (plus '_clients' for Bulyan, which needs n >= 4f+3 = 11), in the
    order they are run: the attacks first, then the defence, then the rest."""
    poison = {"attack": "alpha-poison", "attack-clients": ATTACKERS}
    flip = {"attack": "sign-flip", "attack-clients": ATTACKERS}
    runs: dict[str, dict[str, Any]] = {"clean/FedAvg": {}, "sign-flip/FedAvg": {**flip}}
    for name, over in ROBUST.items():
        runs[f"alpha-poison/{name}"] = {**over, **poison}
    for name, over in ROBUST.items():
        runs[f"sign-flip/{name}"] = {**over, **flip}
    for attack in (poison, flip):
        for name, over in ROBUST.items():
            runs[f"{attack['attack']}/{name}+{DEFENCE}"] = {**over, **attack, "alpha-defence": DEFENCE}
    for name, over in ROBUST.items():
        runs[f"alpha-poison/{name}+norm-screen"] = {**over, **poison, "alpha-defence": "norm-screen"}
    runs["alpha-poison/FedAvg+trimmed-mean"] = {**poison, "alpha-defence": "trimmed-mean"}
    for attack in (poison, flip):  # Bulyan with f = 2 needs 11 nodes: 2 attackers among 11
        bulyan = {"strategy": "Bulyan", "num-malicious-nodes": 2, **attack, "_clients": 11}
        runs[f"{attack['attack']}/Bulyan-11nodes"] = bulyan
        runs[f"{attack['attack']}/Bulyan-11nodes+{DEFENCE}"] = {**bulyan, "alpha-defence": DEFENCE}
    for name in ("Krum", "MultiKrum", "FedMedian", "FedTrimmedAvg"):  # what the robust rules cost without attack
        runs[f"clean/{name}"] = dict(ROBUST[name])
    runs[f"clean/FedAvg+{DEFENCE}"] = {"alpha-defence": DEFENCE}
    for attack in (poison, flip):  # whole replies screened by their weight or logit update norm
        runs[f"{attack['attack']}/FedAvg+update-screen"] = {**attack, "alpha-defence": "update-screen"}
    runs["clean/FedAvg+update-screen"] = {"alpha-defence": "update-screen"}
    return runs


RUNS = _runs()


def run_config(overrides: dict[str, Any], seed: int, results_dir: Path) -> tuple[dict[str, Any], int]:
    """The flat run config of one grid run and its number of clients."""
    over = dict(overrides)
    clients = int(over.pop("_clients", CLIENTS))
    flat = {
        **over,
        "seed": seed,
        "num-partitions": clients,
        "min-available-nodes": clients,
        "torch-threads": 1,
        "results-dir": str(results_dir.resolve()),
    }
    return flat, clients


def run_one(name: str, seed: int, out: Path) -> Path:
    """One run of the grid, in this process; returns its results folder."""
    from fedmetanas_core.method.training import run_settings
    from fedmetanas_core.run.config import RunConfig
    from harness.local_grid import LocalGrid, task_identity
    from server_app.app import run_experiment
    from server_app.strategy import check_strategy

    folder = out / "runs" / f"seed-{seed}" / name.replace("/", "__")
    flat, clients = run_config(RUNS[name], seed, folder)
    cfg = RunConfig.from_flat(flat)
    check_strategy(cfg)
    with task_identity(), run_settings(cfg, 1):  # messages made outside a Flower process need an identity
        run_experiment(LocalGrid(1000 + seed, dict(cfg), clients), cfg)
    return folder


def partial_summary(folder: Path, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """For a run that has not finished: the last checkpointed round's test accuracy and the genotype
    derived from its checkpoint (logits and masks), as ``summary.json`` would hold them."""
    import torch

    from fedmetanas_core.method.genotype import derive_genotype
    from fedmetanas_core.method.training import space_from_config
    from fedmetanas_core.run.config import RunConfig
    from fedmetanas_core.run.outputs import load_checkpoint

    ck = load_checkpoint(folder)
    cfg = RunConfig.from_flat(ck["config"], check_paths=False)
    space = space_from_config(cfg, 10, 1)  # digits: 10 classes, 1 channel
    arch = {k: torch.as_tensor(v) for k, v in ck["arrays"].items() if k.startswith("arch.")}
    done = [r for r in rounds if r["round"] <= ck["round"]]
    return {
        "final_test_accuracy": done[-1]["accuracy"],
        "genotype": derive_genotype(space, arch, ck["masks"]).to_dict(),
        "rejected_replies": sum(r["rejected"] for r in done),
        "total_time_s": None,
        "partial_rounds": ck["round"],
    }


def row(name: str, seed: int, folder: Path) -> dict[str, Any]:
    """The table's numbers for one run, read from its summary.json and rounds.jsonl (a run still
    going: from its last checkpoint, marked with ``partial_rounds``)."""
    from fedmetanas_core.threats.attacks import parameter_free_count

    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines() if line]
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
    else:
        summary = partial_summary(folder, rounds)
        rounds = rounds[: summary["partial_rounds"]]
    attack, _, setup = name.partition("/")
    overrides = RUNS[name]
    return {
        "run": name,
        "attack": attack,
        "strategy": overrides.get("strategy", "FedAvg"),
        "alpha_defence": overrides.get("alpha-defence", "none"),
        "clients": int(overrides.get("_clients", CLIENTS)),
        "seed": seed,
        "final_test_accuracy": summary["final_test_accuracy"],
        "parameter_free_ops": parameter_free_count(summary["genotype"]),
        "genotype": summary["genotype"],
        "rejected_replies": summary["rejected_replies"],
        "alpha_screened": sum(r.get("alpha-screened", 0) for r in rounds),
        "parameter_free_mass": parameter_free_mass(rounds),
        "skipped_rounds": sum(1 for r in rounds if not r.get("aggregated", True)),
        "total_time_s": summary.get("total_time_s"),
        "partial_rounds": summary.get("partial_rounds"),
    }


def parameter_free_mass(rounds: list[dict[str, Any]]) -> float | None:
    """Mean softmax(alpha logits) mass on skip / pooling per edge (both cell types, no masks) in the
    round that decided the cell (the first with one op per edge left; else the last): how far the
    aggregated logits leaned to parameter-free ops when the architecture was fixed."""
    from fedmetanas_core.threats.attacks import PARAMETER_FREE

    rows = [r for r in rounds if "alpha-logits" in r]
    if not rows:
        return None
    decided = next((r for r in rows if r.get("cell-decided")), rows[-1])
    free = [i for i, p in enumerate(decided["primitives"]) if p in PARAMETER_FREE]
    masses = []
    for cell in decided["alpha-logits"].values():
        for logits in cell:
            e = [math.exp(x - max(logits)) for x in logits]
            masses.append(sum(e[i] for i in free) / sum(e))
    return sum(masses) / len(masses)


def _ops(genotype: dict, cell: str) -> str:
    return ", ".join(choice["op"] for node in genotype[cell] for choice in node)


def changed_choices(genotype: dict, reference: dict) -> int:
    """(op, input) choices of ``genotype`` that differ from ``reference``'s at the same place (of 8)."""
    return sum(
        a != b
        for cell in reference
        for node_a, node_b in zip(genotype[cell], reference[cell], strict=False)
        for a, b in zip(node_a, node_b, strict=False)
    )


def _mass(r: dict[str, Any]) -> str:
    return "n/a" if r.get("parameter_free_mass") is None else f"{r['parameter_free_mass']:.2f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per run; accuracy and genotype against the attack-free FedAvg run of the same seed."""
    clean = {r["seed"]: r for r in rows if r["run"] == "clean/FedAvg"}
    lines = [
        "| run (attack / strategy + alpha defence) | seed | clients | final test acc. | vs attack-free (points) | "
        "parameter-free ops normal / reduce (of 4) | choices changed vs attack-free (of 8) | parameter-free "
        "softmax mass when the cell is decided (attack-free: see its row) | normal cell | reduce cell | "
        "alpha-screened replies |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = clean.get(r["seed"])
        diff = f"{100 * (r['final_test_accuracy'] - base['final_test_accuracy']):+.1f}" if base else "n/a"
        changed = changed_choices(r["genotype"], base["genotype"]) if base else "n/a"
        pf = r["parameter_free_ops"]
        run = (
            r["run"]
            if not r.get("partial_rounds")
            else f"{r['run']} (**unfinished: round {r['partial_rounds']} of 20**)"
        )
        lines.append(
            f"| {run} | {r['seed']} | {r['clients']} | {r['final_test_accuracy']:.4f} | {diff} | {pf['normal']} / "
            f"{pf['reduce']} "
            f"| {changed} | {_mass(r)} | {_ops(r['genotype'], 'normal')} | {_ops(r['genotype'], 'reduce')} | "
            f"{r['alpha_screened']} |"
        )
    return "\n".join(lines) + "\n"


def over_seeds(rows: list[dict[str, Any]]) -> str:
    """Runs measured on more than one seed: mean +- std of the final accuracy and of its difference
    to the same seed's attack-free run, and each seed's parameter-free ops and changed choices."""
    import statistics

    clean = {r["seed"]: r for r in rows if r["run"] == "clean/FedAvg"}
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if not r.get("partial_rounds"):
            by_run.setdefault(r["run"], []).append(r)
    lines = [
        "| run | seeds | final test acc. (mean +- std) | vs attack-free, same seed (points, mean +- std) | "
        "parameter-free ops normal / reduce, per seed | choices changed vs attack-free, per seed |",
        "|---|---|---|---|---|---|",
    ]
    for run, rs in by_run.items():
        if len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = [r["final_test_accuracy"] for r in rs]
        diffs = [
            100 * (r["final_test_accuracy"] - clean[r["seed"]]["final_test_accuracy"]) for r in rs if r["seed"] in clean
        ]
        pf = ", ".join(f"{r['parameter_free_ops']['normal']}/{r['parameter_free_ops']['reduce']}" for r in rs)
        changed = ", ".join(
            str(changed_choices(r["genotype"], clean[r["seed"]]["genotype"])) if r["seed"] in clean else "n/a"
            for r in rs
        )
        diff = f"{statistics.mean(diffs):+.1f} +- {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else "n/a"
        lines.append(
            f"| {run} | {', '.join(str(r['seed']) for r in rs)} | {statistics.mean(acc):.4f} +- "
            f"{statistics.stdev(acc):.4f} "
            f"| {diff} | {pf} | {changed} |"
        )
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def collect(out: Path, seeds: list[int], names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for seed in seeds:
        for name in names:
            folder = out / "runs" / f"seed-{seed}" / name.replace("/", "__")
            if (folder / "summary.json").is_file() or (folder / "checkpoint.pt").is_file():
                rows.append(row(name, seed, folder))
    (out / "attacks.json").write_text(json.dumps(rows, indent=1) + "\n")
    seeds_table = over_seeds(rows)
    (out / "attacks.md").write_text(markdown(rows) + (f"\nOver seeds:\n\n{seeds_table}" if seeds_table else ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default="benchmarks/results/attacks", help="folder for runs/, attacks.json, attacks.md"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", default=None, help=f"run names; default all: {', '.join(RUNS)}")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one process and one torch thread each")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one run in this process (used by the pool)
    parser.add_argument("--table-only", action="store_true", help="only rewrite attacks.json / attacks.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    names = args.only or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"attacks: error: unknown run {unknown[0]!r}; one of {', '.join(RUNS)}", file=sys.stderr)
        return 2
    if args.run:
        run_one(args.run, args.seeds[0], out)
        return 0
    if not args.table_only:
        todo = [
            (n, s)
            for s in args.seeds
            for n in names
            if not (out / "runs" / f"seed-{s}" / n.replace("/", "__") / "summary.json").is_file()
        ]
        running: list[tuple[subprocess.Popen, str, int, float]] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)
        while todo or running:
            while todo and len(running) < args.jobs:
                name, seed = todo.pop(0)
                log = open(out / "logs" / f"seed-{seed}__{name.replace('/', '__')}.log", "w")
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.attacks",
                    "--out",
                    str(out),
                    "--seeds",
                    str(seed),
                    "--run",
                    name,
                ]
                running.append(
                    (
                        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()),
                        name,
                        seed,
                        time.time(),
                    )
                )
            time.sleep(2)
            for proc, name, seed, t0 in list(running):
                if proc.poll() is not None:
                    running.remove((proc, name, seed, t0))
                    print(f"{name} seed {seed}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
                    collect(out, args.seeds, list(RUNS))
    rows = collect(out, args.seeds, list(RUNS))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
