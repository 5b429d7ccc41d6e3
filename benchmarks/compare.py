"""Side-by-side comparison over seeds: FedMetaNAS, FedNAS, FedAvg, and the NAS sanity baselines.

    python -m benchmarks.compare --preset cifar10-cpu --seeds 0,1,2
    python -m benchmarks.compare --preset digits --sweep --seeds 0,1,2   # non-IID robustness sweep
    python -m benchmarks.compare --preset cifar10-cpu --seeds 0,1,2 --tables-only  # rebuild outputs

Each method is a real ``fedmetanas run`` (Flower simulation through the local SuperLink), one
after the other, on identical partitions per seed. The preset's file (``conf/<preset>.toml``) sets
the data, the space and every method's budget; ``-c`` adds overrides for all methods. Methods:

- ``fedmetanas``, ``fednas``, ``fedavg`` (the small CNN);
- ``fedavg-random-cell``: FedAvg on a cell drawn at random from the same search space (one
  genotype per seed), same cells and channels as the searched network: the NAS sanity check;
- ``fedavg-matched``: FedAvg on the small CNN made as wide as gives the searched network's number
  of parameters (per seed): does the search beat a plain network of the same size?

Writes ``comparison.json`` (per method: mean and std over seeds, and every seed's row),
``comparison.md`` and ``comparison_accuracy_vs_time.png`` (mean with a +-std band) into ``--out``;
the sweep adds ``sweep.json`` and ``sweep.md``. Runs are read, averaged over seeds, printed and
drawn with ``fedmetanas_core.report`` (``load``, ``seeds``, ``format``); what is here is the
comparison's own: its methods, budgets, rows and tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

from fedmetanas_core.report.canvas import COMPARISON_FIGURE
from fedmetanas_core.report.format import format_mean_std, format_number
from fedmetanas_core.report.load import RunData, images_to_reach, load_run, time_to_reach
from fedmetanas_core.report.seeds import draw_accuracy_over_seeds, mean_std, over_seeds
from fedmetanas_core.run.outputs import machine_description
from fedmetanas_core.util.atomic import atomic_write_text
from harness.cli import run_command

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fedmetanas", "fednas", "fedavg", "fedavg-random-cell", "fedavg-matched")
SWEEP = (("dirichlet", 0.1), ("dirichlet", 0.5), ("dirichlet", 1.0), ("iid", 0.5))
LAST_ROUNDS = 5


# ---------------------------------------------------------------------------------------------
# running


def _baseline_overrides(method: str, seed_dir: Path, seed: int, preset: Path, overrides: list[str]) -> list[str]:
    """The fedavg-* baselines are FedAvg runs with a fixed network chosen here."""
    if method == "fedavg-random-cell":
        from fedmetanas_core.method.genotype import random_genotype
        from fedmetanas_core.run.config import RunConfig
        from harness.cli import parse_run_config

        cfg = RunConfig.from_flat(parse_run_config([str(preset), *overrides, f"seed={seed}"]), check_paths=False)
        path = seed_dir / "random-cell-genotype.yaml"
        seed_dir.mkdir(parents=True, exist_ok=True)
        random_genotype(cfg.primitive_list, cfg.num_nodes, seed).save_yaml(path)
        return [f'fedavg-genotype="{path}"']
    if method == "fedavg-matched":
        import torch

        from fedmetanas_core.method.genotype import simple_cnn_channels_for
        from fedmetanas_core.space import SpaceConfig

        searched = seed_dir / "fedmetanas"
        if not (searched / "summary.json").is_file():
            raise SystemExit("fedavg-matched needs this seed's fedmetanas run first (its parameter count)")
        payload = torch.load(searched / "derived_model.pt", map_location="cpu", weights_only=True)
        space = SpaceConfig(**{**payload["space"], "primitives": tuple(payload["space"]["primitives"])})
        params = finished_run(searched).summary["params"]
        return [f"fedavg-channels={simple_cnn_channels_for(space, params)}"]
    return []


def run_method(
    preset: Path,
    method: str,
    seed_dir: Path,
    seed: int,
    overrides: list[str],
    num_supernodes: int,
    baselines: bool = True,
) -> RunData:
    """``fedmetanas run`` of ``method`` into ``seed_dir / method``; a ``fedavg-*`` method runs as
    fedavg, with this comparison's fixed network when ``baselines`` (others pass theirs in ``overrides``)."""
    out = seed_dir / method
    base = method.split("-")[0] if method.startswith("fedavg") else method
    extra = _baseline_overrides(method, seed_dir, seed, preset, overrides) if baselines else []
    items = [str(preset), f'method="{base}" results-dir="{out}"', *overrides, f"seed={seed}", *extra]
    run_items(items, num_supernodes, method)
    return finished_run(out)


def run_items(items: list[str], num_supernodes: int, what: str) -> None:
    """One real ``fedmetanas run`` of the ``-c`` items, its command echoed; exits when it fails."""
    cmd = run_command(items, num_supernodes)
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{what} run failed (exit {done.returncode}); see the log above")


def add_queue_arguments(parser: argparse.ArgumentParser, methods: tuple[str, ...]) -> None:
    """The flags every seed queue of real runs takes (the frontier, the device tiers)."""
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(methods))
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("-c", action="append", default=[], help="run-config overrides for every run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables and plots from --out")


def finished_run(out: Path) -> RunData:
    """A finished run's summary, config and rounds (``report.load_run``); exits naming what is
    missing when the run did not finish."""
    run = load_run(out)
    if not run.finished:
        raise SystemExit(f"{out} is not a finished run: {'; '.join(run.problems)}")
    return run


# ---------------------------------------------------------------------------------------------
# one seed


def budget(cfg: dict[str, Any]) -> str:
    """The method's training budget in words, from the run's own config.yaml."""
    rounds = cfg["num-server-rounds"]
    schedule = ", cosine lr" if cfg.get("lr-schedule", "constant") == "cosine" else ""
    if cfg["method"] == "fedmetanas":
        text = f"{rounds} rounds x {cfg['local-meta-iters']} meta-steps ({cfg['inner-steps']} inner)"
        return text + (f", discrete from round {cfg['discrete-round']}" if cfg.get("discrete-round") else "") + schedule
    if cfg["method"] == "fednas":
        return (
            f"search {rounds} rounds x {cfg['local-epochs']} epoch(s), "
            f"retrain {cfg['retrain-rounds']} rounds x {cfg['retrain-local-epochs']} epoch(s)"
        ) + schedule
    return f"{rounds} rounds x {cfg['local-epochs']} epoch(s)" + schedule


def last_rounds_mean(rounds: list[dict[str, Any]], n: int = LAST_ROUNDS) -> float | None:
    """Mean test accuracy over the deployed model's last ``n`` rounds: steadier than the last round
    alone when accuracy moves a point or two from round to round."""
    return mean_std(r.get("accuracy") for r in rounds[-n:])[0]


def _megabytes(summary: dict[str, Any]) -> float | None:
    """Arrays sent to and received from the clients over the whole run, in MB (10^6 bytes); None for
    runs from before the bytes were logged."""
    if summary.get("bytes_sent") is None:
        return None
    return (summary["bytes_sent"] + summary["bytes_received"]) / 1e6


def comparison_rows(runs: dict[str, RunData]) -> list[dict[str, Any]]:
    """One row per method of one seed; times to reach are against that seed's FedNAS final accuracy."""
    target = runs["fednas"].summary["final_test_accuracy"] if "fednas" in runs else None
    rows = []
    for method, run in runs.items():
        s = run.summary
        rows.append(
            {
                "method": method,
                "budget": budget(run.config),
                "final_test_accuracy": s["final_test_accuracy"],
                "last_rounds_mean_accuracy": last_rounds_mean(run.rounds),
                "supernet_test_accuracy": s["supernet_test_accuracy"],
                "search_time_s": s["search_time_s"],
                "retrain_time_s": s["retrain_time_s"],
                "total_time_s": s["total_time_s"],
                "time_to_reach_fednas_accuracy_s": time_to_reach(run.rounds, target) if target is not None else None,
                "images_to_reach_fednas_accuracy": images_to_reach(run.rounds, target) if target is not None else None,
                "images_total": images_to_reach(run.rounds),
                "personalized_accuracy": s["personalized_accuracy"],
                "personalized_accuracy_before": s["personalized_accuracy_before"],
                "params": s["params"],
                "mb_sent_received": _megabytes(s),
                "rounds": s["rounds"],
                "retrain_rounds": s["retrain_rounds"],
                "steps_per_client_round": s.get("steps_per_client_round"),
                "images_per_client_round": s.get("images_per_client_round"),
                "genotype": s.get("genotype"),
                "seed": s.get("seed"),
                "results_dir": s["results_dir"],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# over seeds

AVERAGED = (
    "final_test_accuracy",
    "last_rounds_mean_accuracy",
    "personalized_accuracy",
    "personalized_accuracy_before",
    "total_time_s",
    "search_time_s",
    "retrain_time_s",
    "time_to_reach_fednas_accuracy_s",
    "params",
    "mb_sent_received",
    "steps_per_client_round",
    "images_per_client_round",
    "images_to_reach_fednas_accuracy",
    "images_total",
)


def aggregate_rows(per_seed: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per method: mean and std over seeds of every figure (a time to reach counts only the seeds
    that reached FedNAS's accuracy; ``reached`` says how many did), and the time ratio to FedNAS."""
    methods = list(dict.fromkeys(r["method"] for rows in per_seed.values() for r in rows))
    out = []
    for method in methods:
        rows = [r for rows in per_seed.values() for r in rows if r["method"] == method]
        agg: dict[str, Any] = {"method": method, "budget": rows[0]["budget"], "seeds": [r["seed"] for r in rows]}
        agg.update(over_seeds(rows, AVERAGED))
        agg["reached_fednas_accuracy"] = sum(r["time_to_reach_fednas_accuracy_s"] is not None for r in rows)
        ratios, image_ratios = [], []
        for _seed, seed_rows in per_seed.items():
            by = {r["method"]: r for r in seed_rows}
            mine, fednas = by.get(method), by.get("fednas")
            if mine and fednas and mine["time_to_reach_fednas_accuracy_s"] is not None:
                ratios.append(mine["time_to_reach_fednas_accuracy_s"] / fednas["total_time_s"])
            if (
                mine
                and fednas
                and mine.get("images_to_reach_fednas_accuracy") is not None
                and fednas.get("images_total")
            ):
                image_ratios.append(mine["images_to_reach_fednas_accuracy"] / fednas["images_total"])
        agg["time_to_reach_over_fednas_total_mean"] = mean_std(ratios)[0]
        agg["images_to_reach_over_fednas_total_mean"] = mean_std(image_ratios)[0]
        agg["rounds"], agg["retrain_rounds"] = rows[0]["rounds"], rows[0]["retrain_rounds"]
        out.append(agg)
    return out


def _pm(row: dict[str, Any], key: str) -> str:
    return format_mean_std(row.get(f"{key}_mean"), row.get(f"{key}_std"))


def markdown_table(rows: list[dict[str, Any]], seeds=(), split: str = "test") -> str:
    """The aggregated rows: mean ± std over the seeds; accuracies with 4 decimals, seconds as whole
    numbers, missing figures as "–" (``report.format``). A method with fewer of ``seeds`` than the
    others names its own."""
    head = (
        f"| method | budget | final {split} acc | mean acc, last 5 rounds | personalized acc (before → after) | "
        f"total s "
        "| s to reach FedNAS acc (x FedNAS time; seeds) | params | MB sent + received | steps / client / round "
        "| images / client / round | images / client to reach FedNAS acc (x FedNAS's) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = len(r["seeds"])
        name = (
            r["method"]
            if not seeds or set(r["seeds"]) >= set(seeds)
            else f"{r['method']} (seeds {', '.join(map(str, r['seeds']))})"
        )
        ratio = r.get("time_to_reach_over_fednas_total_mean")
        reach = (
            "–"
            if r["time_to_reach_fednas_accuracy_s_mean"] is None
            else (
                f"{format_number(r['time_to_reach_fednas_accuracy_s_mean'], 0)} "
                f"({format_number(ratio, 2)} x; {r['reached_fednas_accuracy']}/{n})"
            )
        )
        image_ratio = r.get("images_to_reach_over_fednas_total_mean")
        images = (
            "–"
            if r.get("images_to_reach_fednas_accuracy_mean") is None
            else (f"{format_number(r['images_to_reach_fednas_accuracy_mean'], 0)} ({format_number(image_ratio, 2)} x)")
        )
        lines.append(
            f"| {name} | {r['budget']} | {_pm(r, 'final_test_accuracy')} | {_pm(r, 'last_rounds_mean_accuracy')} "
            f"| {format_number(r['personalized_accuracy_before_mean'])} → "
            f"{format_number(r['personalized_accuracy_mean'])} "
            f"| {format_number(r['total_time_s_mean'], 0)} | {reach} | {format_number(r['params_mean'], 0)} "
            f"| {format_number(r.get('mb_sent_received_mean'), 2)} | "
            f"{format_number(r['steps_per_client_round_mean'], 1)} | "
            f"{format_number(r['images_per_client_round_mean'], 0)} | {images} |"
        )
    return "\n".join(lines)


def compare(
    preset: str,
    out: Path,
    overrides: list[str],
    num_supernodes: int,
    methods=METHODS,
    rerun: bool = True,
    seeds=(0,),
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    preset_file = ROOT / "conf" / f"{preset}.toml"
    runs: dict[int, dict[str, RunData]] = {}
    left_out: list[str] = []
    for seed in seeds:
        seed_dir = out / f"seed-{seed}"
        runs[seed] = {}
        for m in methods:
            if rerun:
                runs[seed][m] = run_method(preset_file, m, seed_dir, seed, overrides, num_supernodes)
            elif (run := load_run(seed_dir / m)).finished:
                runs[seed][m] = run
            else:  # rebuilding tables while other seeds still run: say what is missing, never guess it
                left_out.append(f"{m} seed {seed}")
    if left_out:
        print(f"left out, not finished: {', '.join(left_out)}", flush=True)
    if not any(runs.values()):
        raise SystemExit(f"no finished run in {out}")
    split = eval_split(runs)
    per_seed = {seed: comparison_rows(seed_runs) for seed, seed_runs in runs.items() if seed_runs}
    rows = aggregate_rows(per_seed)
    result = {
        "preset": preset,
        "machine": machine_description(),
        "overrides": overrides,
        "seeds": list(seeds),
        "eval_split": split,
        "rows": rows,
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "left_out": left_out,
    }
    atomic_write_text(out / "comparison.json", json.dumps(result, indent=2))
    seeds_text = ", ".join(map(str, seeds))
    missing = f"\n\nNot finished, left out: {', '.join(left_out)}." if left_out else ""
    scored = (
        ""
        if split == "test"
        else (
            ". Accuracies are on the validation split (the clients' local test splits, carved from their "
            "training data), not the test set"
        )
    )
    atomic_write_text(
        out / "comparison.md",
        f"Preset `{preset}`, seeds {seeds_text}, on "
        f"{result['machine']}{scored}{missing}\n\n{markdown_table(rows, seeds, split)}\n",
    )
    by_method = {m: [seed_runs[m] for seed_runs in runs.values() if m in seed_runs] for m in methods}
    draw_accuracy_over_seeds(by_method, out / COMPARISON_FIGURE)
    print(markdown_table(rows, seeds, split))
    return result


def eval_split(runs: dict[int, dict[str, RunData]]) -> str:
    """What every run scored on: test or validation; one table never mixes the two."""
    splits = {run.summary.get("eval_split", "test") for seed_runs in runs.values() for run in seed_runs.values()}
    if len(splits) > 1:
        raise SystemExit(f"these runs scored on different splits ({', '.join(sorted(splits))}): compare them apart")
    return splits.pop()


def partition_name(partitioner: str, alpha: float) -> str:
    return "iid" if partitioner == "iid" else f"dirichlet-{alpha}"


def sweep(
    preset: str,
    out: Path,
    overrides: list[str],
    num_supernodes: int,
    methods=METHODS,
    rerun: bool = True,
    seeds=(0,),
    partitions: tuple[str, ...] | None = None,
) -> dict:
    """Every partition of SWEEP (or the named ones: two shells can share a sweep, then one
    ``--tables-only`` call writes sweep.json over all of them)."""
    lines = ["| partition | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    table = []
    for partitioner, alpha in SWEEP:
        name = partition_name(partitioner, alpha)
        if partitions is not None and name not in partitions:
            continue
        extra = overrides + [f'partitioner="{partitioner}" dirichlet-alpha={alpha}']
        result = compare(preset, out / name, extra, num_supernodes, methods, rerun, seeds)
        by = {r["method"]: r for r in result["rows"]}
        lines.append(f"| {name} | " + " | ".join(_pm(by[m], "final_test_accuracy") for m in methods) + " |")
        for r in result["rows"]:
            table.append(
                {
                    "partition": name,
                    "method": r["method"],
                    "seeds": r["seeds"],
                    "eval_split": result["eval_split"],
                    "final_test_accuracy_mean": r["final_test_accuracy_mean"],
                    "final_test_accuracy_std": r["final_test_accuracy_std"],
                    "personalized_accuracy_mean": r["personalized_accuracy_mean"],
                    "personalized_accuracy_before_mean": r["personalized_accuracy_before_mean"],
                    "total_time_s_mean": r["total_time_s_mean"],
                    "params_mean": r["params_mean"],
                    "steps_per_client_round_mean": r["steps_per_client_round_mean"],
                    "images_per_client_round_mean": r["images_per_client_round_mean"],
                }
            )
    summary = {"preset": preset, "machine": machine_description(), "seeds": list(seeds), "rows": table}
    if partitions is not None:  # a share of the sweep: its runs are on disk, the tables come later
        return summary
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2))
    atomic_write_text(
        out / "sweep.md",
        f"Final {table[0]['eval_split'] if table else 'test'} accuracy, mean ± std over seeds "
        f"{', '.join(map(str, seeds))}\n\n" + "\n".join(lines) + "\n",
    )
    print("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10-cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("-c", "--run-config", action="append", default=[], help="extra overrides for every method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every method runs on each")
    parser.add_argument("--sweep", action="store_true", help="Dirichlet 0.1 / 0.5 / 1.0 and IID, all methods")
    parser.add_argument("--partitions", default=None, help="sweep only these (e.g. dirichlet-0.1,iid); no sweep.json")
    parser.add_argument(
        "--tables-only", action="store_true", help="rebuild tables, JSON and plots from the runs already in --out"
    )
    args = parser.parse_args(argv)
    methods = tuple(args.methods.split(","))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    out = (
        args.out or ROOT / "benchmarks" / "results" / (f"{args.preset}-sweep" if args.sweep else args.preset)
    ).resolve()
    if "fedavg-matched" in methods and "fedmetanas" not in methods:
        missing = (
            list(seeds)
            if args.sweep
            else [s for s in seeds if not (out / f"seed-{s}" / "fedmetanas" / "summary.json").is_file()]
        )
        if missing:
            parser.error(
                "fedavg-matched matches the fedmetanas run's parameter count: include fedmetanas, or run it "
                f"first for seed(s) {', '.join(map(str, missing))} into {out}"
            )
    if args.sweep:
        parts = tuple(args.partitions.split(",")) if args.partitions else None
        known = {partition_name(p, a) for p, a in SWEEP}
        if parts and not set(parts) <= known:
            parser.error(
                f"unknown partition(s) {', '.join(sorted(set(parts) - known))}; choose from {', '.join(sorted(known))}"
            )
        sweep(args.preset, out, args.run_config, args.num_supernodes, methods, not args.tables_only, seeds, parts)
    else:
        compare(args.preset, out, args.run_config, args.num_supernodes, methods, not args.tables_only, seeds)


if __name__ == "__main__":
    main()
