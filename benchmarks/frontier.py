"""The accuracy-cost frontier: every method at the same budgets, over seeds.

    python -m benchmarks.frontier --preset digits --partition dirichlet:0.5 \
        --budgets macs:20000,macs:50000,macs:130000,macs:350000 --seeds 0,1,2 --out DIR
    python -m benchmarks.frontier ... --tables-only   # rebuild frontier.json / .md / plots from DIR

For every budget and seed, real ``fedmetanas run`` s (``benchmarks.compare.run_method``: the Flower
simulation through the local SuperLink) of:

- ``fedmetanas``: the budget, the space sized to it (``init-channels = 0``), derivation within it;
- ``fednas``: the same budget, cost term and sized space (search, then FedAvg retraining);
- ``fedavg-cnn``: FedAvg on the small CNN family as wide as the budget allows (width multiplier);
- ``fedavg-random-cell``: FedAvg on a cell drawn uniformly from the sized space among those within
  the budget (rejection sampling, one per seed): the NAS sanity baseline at equal cost.

Each method keeps the preset's per-method table (its tuned settings). Writes ``frontier.json``
(rows: method, partition, budget, seeds, macs/params/latency means, final test accuracy mean and
std), ``frontier.md`` and ``frontier_macs.png`` / ``frontier_latency.png`` (mean +- std bands).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.compare import ROOT, add_queue_arguments, finished_run, run_method
from fedmetanas_core.report.load import RunData, images_to_reach
from fedmetanas_core.report.seeds import mean_std
from fedmetanas_core.run.outputs import machine_description
from fedmetanas_core.util.atomic import atomic_write_text

METHODS = ("fedmetanas", "fedavg-cnn", "fedavg-random-cell", "fednas")


def budget_dir(budget: str) -> str:
    return budget.replace(":", "-")


def method_overrides(
    method: str, budget: str, seed_dir: Path, seed: int, preset: Path, overrides: list[str]
) -> list[str]:
    """The run-config overrides that put ``method`` at ``budget``: the space sized to a MACs or
    parameter budget; a latency budget keeps the run config's width (a table is measured for one:
    pass ``-c init-channels=0`` with one table per width to size it)."""
    sized = [] if budget.startswith("latency-ms:") else ["init-channels=0"]
    common = [f'budget="{budget}"', *sized]
    if method != "fedavg-random-cell":
        return common
    from fedmetanas_core.method.budget import RANDOM_CELL_TRIES, cost_model, random_genotype_within, run_space
    from harness.cli import resolve_run_config

    items = [str(preset), *overrides, f"seed={seed}", *common, 'method="fedmetanas"']
    _, cfg = resolve_run_config(items)
    space, image_hw = run_space(cfg)
    model = cost_model(cfg, space, image_hw)
    limit = float(budget.split(":")[1])
    genotype = random_genotype_within(space, model, limit, seed)
    if genotype is None:
        raise SystemExit(f"no random cell within {budget} in {RANDOM_CELL_TRIES} draws")
    path = seed_dir / "random-cell-genotype.yaml"
    seed_dir.mkdir(parents=True, exist_ok=True)
    genotype.save_yaml(path)
    return [*common, f'fedavg-genotype="{path}"']


def run_all(args, preset: Path, budgets: list[str], seeds: list[int], methods: list[str], out: Path) -> None:
    partition = partition_overrides(args.partition)
    for seed in seeds:  # a seed over every budget first: an interrupted queue still draws a whole front
        for budget in budgets:
            seed_dir = out / budget_dir(budget) / f"seed-{seed}"
            for method in methods:
                if (seed_dir / method / "summary.json").is_file():
                    continue  # resumable: a finished run is kept
                extra = method_overrides(method, budget, seed_dir, seed, preset, [*partition, *args.c])
                run_method(
                    preset, method, seed_dir, seed, [*partition, *args.c, *extra], args.num_supernodes, baselines=False
                )


def partition_overrides(text: str) -> list[str]:
    name, _, alpha = text.partition(":")
    return [f'partitioner="{name}"'] + ([f"dirichlet-alpha={float(alpha)}"] if alpha else [])


# ---------------------------------------------------------------------------------------------
# rows, table, plots


def frontier_rows(
    out: Path, partition: str, budgets: list[str], seeds: list[int], methods: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for budget in budgets:
        for method in methods:
            runs = [(s, out / budget_dir(budget) / f"seed-{s}" / method) for s in seeds]
            done = [(s, finished_run(d)) for s, d in runs if (d / "summary.json").is_file()]
            if not done:
                continue
            costs = [r.summary.get("cost") or {} for _, r in done]
            acc = [r.summary["final_test_accuracy"] for _, r in done]
            row = {
                "method": method,
                "partition": partition,
                "budget": budget,
                "seeds": [s for s, _ in done],
                "macs_mean": mean_std(c.get("macs") for c in costs)[0],
                "macs_std": mean_std(c.get("macs") for c in costs)[1],
                "params_mean": mean_std(c.get("params") for c in costs)[0],
                "latency_ms_mean": mean_std(c.get("latency_ms") for c in costs)[0],
                "latency_ms_std": mean_std(c.get("latency_ms") for c in costs)[1],
                "final_test_accuracy_mean": mean_std(acc)[0],
                "final_test_accuracy_std": mean_std(acc)[1],
                "within_budget": all(c.get("within_budget") for c in costs),
                "init_channels": [c.get("init_channels") for c in costs],
                "images_per_client_round_mean": mean_std(r.summary.get("images_per_client_round") for _, r in done)[0],
                "total_time_s_mean": mean_std(r.summary.get("total_time_s") for _, r in done)[0],
            }
            if method == "fedmetanas":
                row["images_vs_fednas"] = images_vs_fednas(out / budget_dir(budget), dict(done))
            rows.append(row)
    return rows


def images_vs_fednas(budget_out: Path, fedmetanas_runs: dict[int, RunData]) -> list[dict[str, Any]]:
    """The paper's claim per seed: the training images FedMetaNAS takes to reach FedNAS's final test
    accuracy, as a fraction of all the images FedNAS trained on (None: never reached), and whether
    FedMetaNAS ends at or above it. Empty where FedNAS did not run."""
    out = []
    for seed, mine in fedmetanas_runs.items():
        fednas_dir = budget_out / f"seed-{seed}" / "fednas"
        if not (fednas_dir / "summary.json").is_file():
            continue
        theirs = finished_run(fednas_dir)
        target = theirs.summary["final_test_accuracy"]
        reached, total = images_to_reach(mine.rounds, target), images_to_reach(theirs.rounds)
        out.append(
            {
                "seed": seed,
                "fraction": None if reached is None or not total else reached / total,
                "ends_at_or_above": mine.summary["final_test_accuracy"] >= target,
            }
        )
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| budget | method | seeds | MACs | params | latency (ms) | test accuracy | within budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['final_test_accuracy_mean']:.4f} ± {r['final_test_accuracy_std']:.4f}"
        lat = "-" if r["latency_ms_mean"] is None else f"{r['latency_ms_mean']:.4f}"
        lines.append(
            f"| {r['budget']} | {r['method']} | {len(r['seeds'])} | {r['macs_mean']:,.0f} | {r['params_mean']:,.0f} | "
            f"{lat} | {acc} | {'yes' if r['within_budget'] else 'NO'} |"
        )
    claims = [(r["budget"], c) for r in rows for c in r.get("images_vs_fednas", [])]
    if claims:
        lines += [
            "",
            "FedMetaNAS's training images to reach FedNAS's final test accuracy, as a fraction of FedNAS's "
            "(goal <= 0.5), and whether it ends at or above FedNAS:",
            "",
            "| budget | seed | images fraction | ends at or above |",
            "|---|---|---|---|",
        ]
        for budget, c in claims:
            frac = "never reached" if c["fraction"] is None else f"{c['fraction']:.2f}"
            lines.append(f"| {budget} | {c['seed']} | {frac} | {'yes' if c['ends_at_or_above'] else 'no'} |")
    return "\n".join(lines)


def draw(rows: list[dict[str, Any]], x_key: str, xlabel: str, path: Path) -> None:
    from fedmetanas_core.report.canvas import COMPARISON_FIGURE, line_color, new_figure, save_figure

    fig = new_figure(COMPARISON_FIGURE)
    ax = fig.subplots()
    for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted(
            (r[x_key], r["final_test_accuracy_mean"], r["final_test_accuracy_std"] or 0.0)
            for r in rows
            if r["method"] == method and r[x_key] is not None
        )
        if not pts:
            continue
        xs, mean, std = zip(*pts, strict=False)
        color = line_color(method, k)
        ax.plot(xs, mean, marker="o", color=color, label=method)
        ax.fill_between(
            xs,
            [m - s for m, s in zip(mean, std, strict=False)],
            [m + s for m, s in zip(mean, std, strict=False)],
            color=color,
            alpha=0.2,
        )
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


def write_outputs(out: Path, rows: list[dict[str, Any]], args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "partition": args.partition, "overrides": args.c, "machine": machine_description()}
    atomic_write_text(out / "frontier.json", json.dumps({**meta, "rows": rows}, indent=1))
    atomic_write_text(out / "frontier.md", f"# Frontier: {args.preset}, {args.partition}\n\n{markdown(rows)}\n")
    draw(rows, "macs_mean", "MACs of the deployed network (mean over seeds, log scale)", out / "frontier_macs.png")
    draw(
        rows,
        "latency_ms_mean",
        "measured latency, ms (batch 1, one thread; mean over seeds, log scale)",
        out / "frontier_latency.png",
    )
    print(markdown(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_queue_arguments(parser, METHODS)
    parser.add_argument("--partition", default="dirichlet:0.5", help="PARTITIONER[:DIRICHLET_ALPHA]")
    parser.add_argument("--budgets", required=True, help="comma-separated KIND:LIMIT")
    args = parser.parse_args(argv)
    preset = ROOT / "conf" / f"{args.preset}.toml"
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; one of {', '.join(METHODS)}")
    out = Path(args.out).resolve()
    if not args.tables_only:
        run_all(args, preset, budgets, seeds, methods, out)
    write_outputs(out, frontier_rows(out, args.partition, budgets, seeds, methods), args)


if __name__ == "__main__":
    main()
