"""Device tiers against the baselines that would expose them, over seeds (issue 28).

    python -m benchmarks.tiers --preset digits --tiers macs:20000,macs:160000 --seeds 0,1,2 \
        -c 'reduction-cells="0,1"' --out benchmarks/results/tiers-digits
    python -m benchmarks.tiers ... --tables-only   # rebuild tiers.json / tiers.md / the plot from DIR

Per seed, real ``fedmetanas run`` s (the Flower simulation through a private local SuperLink):

- ``tiered``: FedMetaNAS with ``tiers``: one search, one network per tier, weights shared, every
  client also training the smaller tiers' networks (``train-smaller-tiers``, the default);
- ``tiered-own-tier-only``: the same with ``train-smaller-tiers = false`` (each client trains its
  own tier only: HeteroFL's rule over the supernet), the ablation;
- ``smallest-for-all`` (a): FedMetaNAS at the smallest tier's budget for every client;
- ``only-tier`` (b): per tier, FedMetaNAS with ``only-tier``: a separate search on that tier's
  clients only (the other clients take no part);
- ``heterofl-cnn`` (c): FedAvg with ``tiers``: the small CNN as wide as each tier's budget allows,
  each weight element averaged over every client that trained it (HeteroFL, each client its own
  tier only).

Clients are split over the tiers by ``tier-shares`` (seeded, the same split in every run of a seed).
Per tier: the global test accuracy of the tier's network, and the local test accuracy on that tier's
clients' own test splits, before any personalization (the goals' figure) and after the same
``personalize-steps`` SGD steps on the client's training data for every method (the deployed network
adapted on the device). Writes ``tiers.json`` (rows: method, tier, budget, seeds, macs/params/latency
means, final, local and personalized test accuracy mean and std), ``tiers.md`` and ``tiers.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.compare import ROOT, add_queue_arguments, run_items
from fedmetanas_core.method.tiers import assign_partitions, local_mean, parse_tiers
from fedmetanas_core.report.format import format_mean_std
from fedmetanas_core.report.seeds import mean_std
from fedmetanas_core.run.config_keys import parse_tier_shares
from fedmetanas_core.run.outputs import machine_description
from fedmetanas_core.util.atomic import atomic_write_text

METHODS = ("tiered", "tiered-own-tier-only", "smallest-for-all", "only-tier", "heterofl-cnn")
# per tier: the global test set, the tier's clients before and after personalization (the table's order)
ACCURACY_KEYS = ("final_test_accuracy", "local_test_accuracy", "personalized_accuracy")


def runs_of(method: str, tiers: list) -> list[tuple[str, list[str]]]:
    """(folder, run-config overrides) of a method's runs for one seed."""
    budgets = ",".join(t.budget for t in tiers)
    if method == "tiered":
        return [("tiered", ['method="fedmetanas"', f'tiers="{budgets}"'])]
    if method == "tiered-own-tier-only":  # the ablation: no client trains a smaller tier's network
        return [("tiered-own-tier-only", ['method="fedmetanas"', f'tiers="{budgets}"', "train-smaller-tiers=false"])]
    if method == "smallest-for-all":
        return [("smallest-for-all", ['method="fedmetanas"', f'budget="{tiers[0].budget}"'])]
    if method == "only-tier":
        return [
            (f"only-{t.name}", ['method="fedmetanas"', f'tiers="{budgets}"', f"only-tier={t.index}"]) for t in tiers
        ]
    if method == "heterofl-cnn":
        return [("heterofl-cnn", ['method="fedavg"', f'tiers="{budgets}"', "train-smaller-tiers=false"])]
    raise SystemExit(f"unknown method {method!r}; one of {', '.join(METHODS)}")


def run_all(args, tiers, seeds: list[int], out: Path) -> None:
    for seed in seeds:
        for method in args.methods.split(","):
            for folder, overrides in runs_of(method, tiers):
                run_dir = out / f"seed-{seed}" / folder
                if (run_dir / "summary.json").is_file():
                    continue  # resumable
                items = [
                    str(ROOT / "conf" / f"{args.preset}.toml"),
                    *args.c,
                    "init-channels=0",
                    f'tier-shares="{args.shares}"',
                    *overrides,
                    f'seed={seed} results-dir="{run_dir}"',
                ]
                run_items(items, args.num_supernodes, str(run_dir))


def tier_rows(summary: dict[str, Any], tiers, tier_of_partition: list[int]) -> dict[str, dict[str, Any]]:
    """Per tier name: accuracy on the global test set and on the tier's clients, MACs, params, latency."""
    if summary.get("tiers"):
        return {r["tier"]: r for r in summary["tiers"]}
    rows = {}  # one network for everyone: scored on each tier's clients
    cost = summary["cost"]
    for tier in tiers:
        clients = [c for c in summary["personalized_per_client"] if tier_of_partition[c["partition-id"]] == tier.index]
        rows[tier.name] = {
            "final_test_accuracy": summary["final_test_accuracy"],
            "local_test_accuracy": local_mean(clients, "accuracy-before"),
            "personalized_accuracy": local_mean(clients, "accuracy-after"),
            "macs": cost["macs"],
            "params": summary["params"],
            "latency_ms": cost.get("latency_ms"),
            "within_budget": cost["macs"] <= tier.limit if tier.kind == "macs" else cost["params"] <= tier.limit,
        }
    return rows


def collect(out: Path, tiers, seeds: list[int], num_partitions: int, shares: list[float]) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        for tier in tiers:
            per_seed = []
            for seed in seeds:
                for folder, _ in runs_of(method, tiers):
                    if method == "only-tier" and folder != f"only-{tier.name}":
                        continue
                    path = out / f"seed-{seed}" / folder / "summary.json"
                    if path.is_file():
                        split = assign_partitions(num_partitions, shares, seed)
                        row = tier_rows(json.loads(path.read_text()), tiers, split).get(tier.name)
                        if row is not None:
                            per_seed.append(row)
            if not per_seed:
                continue
            row = {"method": method, "tier": tier.name, "budget": tier.budget, "seeds": len(per_seed)}
            for key in ("macs", "params", "latency_ms"):
                values = [r[key] for r in per_seed if r.get(key) is not None]
                row[f"{key}_mean"] = sum(values) / len(values) if values else None
            for key in ACCURACY_KEYS:
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in per_seed if r.get(key) is not None])
            row["all_within_budget"] = all(r.get("within_budget") for r in per_seed)
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tier | method | seeds | MACs | params | latency ms | global test acc | local test acc (tier's clients) "
        "| tier's clients after personalization |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (float(r["budget"].split(":")[1]), METHODS.index(r["method"]))):
        lat = f"{r['latency_ms_mean']:.3f}" if r["latency_ms_mean"] is not None else "-"
        accuracies = " | ".join(format_mean_std(r.get(f"{k}_mean"), r.get(f"{k}_std")) for k in ACCURACY_KEYS)
        lines.append(
            f"| {r['budget']} | {r['method']} | {r['seeds']} | {r['macs_mean']:,.0f} | {r['params_mean']:,.0f} | "
            f"{lat} | {accuracies} |"
        )
    return "\n".join(lines) + "\n"


def draw(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(
        axes, ("final_test_accuracy", "local_test_accuracy"), ("global test set", "the tier's clients"), strict=True
    ):
        for method in METHODS:
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: float(r["budget"].split(":")[1]))
            if not mine:
                continue
            x = [float(r["budget"].split(":")[1]) for r in mine]
            y = [r[f"{key}_mean"] for r in mine]
            s = [r[f"{key}_std"] for r in mine]
            ax.errorbar(x, y, yerr=s, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("tier budget")
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_of(out: Path, tables_only: bool) -> str:
    """The machine the runs ran on: a rebuild of the tables keeps the one recorded with them."""
    previous = out / "tiers.json"
    if tables_only and previous.is_file():
        recorded = json.loads(previous.read_text()).get("meta", {}).get("machine")
        if recorded:
            return recorded
    return machine_description()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_queue_arguments(parser, METHODS)
    parser.add_argument("--tiers", required=True, help="comma-separated KIND:LIMIT, two or more")
    parser.add_argument("--shares", default="", help="tier-shares ('' = equal)")
    args = parser.parse_args(argv)
    tiers, seeds, out = parse_tiers(args.tiers), [int(s) for s in args.seeds.split(",")], Path(args.out).resolve()
    if not args.tables_only:
        run_all(args, tiers, seeds, out)
    rows = collect(out, tiers, seeds, args.num_supernodes, parse_tier_shares(args.shares, len(tiers)))
    if not rows:
        raise SystemExit(f"no finished runs under {out}")
    machine = machine_of(out, args.tables_only)
    meta = {"preset": args.preset, "tiers": args.tiers, "shares": args.shares, "machine": machine}
    atomic_write_text(out / "tiers.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    atomic_write_text(out / "tiers.md", markdown(rows))
    draw(rows, out / "tiers.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
