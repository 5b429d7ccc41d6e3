"""Side-by-side comparison: FedMetaNAS, FedNAS and FedAvg on identical partitions, seed and machine.

    python -m benchmarks.compare --preset cifar10-cpu
    python -m benchmarks.compare --preset digits --sweep      # non-IID robustness sweep
    python -m benchmarks.compare --preset cifar10-cpu --tables-only  # rebuild outputs from finished runs

Each method is a real ``fedmetanas run`` (Flower simulation through the local SuperLink), one
after the other. The preset's file (``conf/<preset>.toml``) sets the data, the space and every
method's budget; ``-c`` adds overrides for all methods. Writes ``comparison.json``,
``comparison.md`` and ``comparison_accuracy_vs_time.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fedmetanas_core.outputs import machine_description

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fedmetanas", "fednas", "fedavg")
SWEEP = (("dirichlet", 0.1), ("dirichlet", 0.5), ("dirichlet", 1.0), ("iid", 0.5))


def run_method(preset: Path, method: str, out: Path, overrides: list[str], num_supernodes: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fedmetanas_core.cli", "run", "--num-supernodes", str(num_supernodes), "-c", str(preset)]
    cmd += ["-c", f'method="{method}" results-dir="{out}"'] + [x for o in overrides for x in ("-c", o)]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{method} run failed (exit {done.returncode}); see the log above")
    return load_run(out)


def load_run(out: Path) -> dict[str, Any]:
    """A finished run's summary with its config and per-round log, as the comparison reads them."""
    summary = json.loads((out / "summary.json").read_text())
    summary["config"] = yaml.safe_load((out / "config.yaml").read_text())
    summary["rounds_log"] = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return summary


def time_to_reach(rounds: list[dict[str, Any]], target: float) -> float | None:
    """First wall-clock second at which the deployed model's test accuracy reached ``target``."""
    for row in rounds:
        if row.get("accuracy", 0.0) >= target - 1e-12:
            return float(row["elapsed-s"])
    return None


def budget(cfg: dict[str, Any]) -> str:
    """The method's training budget in words, from the run's own config.yaml."""
    rounds = cfg["num-server-rounds"]
    schedule = ", cosine lr" if cfg.get("lr-schedule", "constant") == "cosine" else ""
    if cfg["method"] == "fedmetanas":
        text = f"{rounds} rounds x {cfg['local-meta-iters']} meta-steps ({cfg['inner-steps']} inner)"
        return text + (f", discrete from round {cfg['discrete-round']}" if cfg.get("discrete-round") else "") + schedule
    if cfg["method"] == "fednas":
        return (f"search {rounds} rounds x {cfg['local-epochs']} epoch(s), "
                f"retrain {cfg['retrain-rounds']} rounds x {cfg['retrain-local-epochs']} epoch(s)") + schedule  # fmt: skip
    return f"{rounds} rounds x {cfg['local-epochs']} epoch(s)" + schedule


LAST_ROUNDS = 5


def last_rounds_mean(rounds: list[dict[str, Any]], n: int = LAST_ROUNDS) -> float | None:
    """Mean test accuracy over the deployed model's last ``n`` rounds: steadier than the last round
    alone when accuracy moves a point or two from round to round."""
    accs = [r["accuracy"] for r in rounds[-n:] if r.get("accuracy") is not None]
    return float(sum(accs) / len(accs)) if accs else None


def comparison_rows(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    target = summaries["fednas"]["final_test_accuracy"] if "fednas" in summaries else None
    rows = []
    for method, s in summaries.items():
        rows.append(
            {
                "method": method,
                "budget": budget(s["config"]),
                "final_test_accuracy": s["final_test_accuracy"],
                "last_rounds_mean_accuracy": last_rounds_mean(s["rounds_log"]),
                "supernet_test_accuracy": s["supernet_test_accuracy"],
                "search_time_s": s["search_time_s"],
                "retrain_time_s": s["retrain_time_s"],
                "total_time_s": s["total_time_s"],
                "time_to_reach_fednas_accuracy_s": time_to_reach(s["rounds_log"], target) if target is not None else None,
                "personalized_accuracy": s["personalized_accuracy"],
                "personalized_accuracy_before": s["personalized_accuracy_before"],
                "params": s["params"],
                "rounds": s["rounds"],
                "retrain_rounds": s["retrain_rounds"],
                "results_dir": s["results_dir"],
            }
        )
    return rows


def _fmt(v: Any, digits: int = 4) -> str:
    """Accuracies with 4 decimals, seconds (digits=0) as whole numbers, missing as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | budget | final test acc | supernet acc | personalized acc (before → after) | search s | retrain s | total s "
            f"| s to reach FedNAS acc | params | rounds (+retrain) | mean acc, last {LAST_ROUNDS} rounds |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget']} | {_fmt(r['final_test_accuracy'])} | {_fmt(r['supernet_test_accuracy'])} "
            f"| {_fmt(r['personalized_accuracy_before'])} → {_fmt(r['personalized_accuracy'])} | {_fmt(r['search_time_s'], 0)} "
            f"| {_fmt(r['retrain_time_s'], 0)} | {_fmt(r['total_time_s'], 0)} | {_fmt(r['time_to_reach_fednas_accuracy_s'], 0)} "
            f"| {r['params']} | {r['rounds']}{' + ' + str(r['retrain_rounds']) if r['retrain_rounds'] else ''} "
            f"| {_fmt(r.get('last_rounds_mean_accuracy'))} |"
        )
    return "\n".join(lines)


def plot_accuracy_vs_time(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=100)
    for method, s in summaries.items():
        rows = s["rounds_log"]
        ax.plot([r["elapsed-s"] for r in rows], [r["accuracy"] for r in rows], marker=".", label=method)
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("test accuracy of the deployed model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(preset: str, out: Path, overrides: list[str], num_supernodes: int, methods=METHODS, rerun: bool = True) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    preset_file = ROOT / "conf" / f"{preset}.toml"
    if rerun:
        summaries = {m: run_method(preset_file, m, out / m, overrides, num_supernodes) for m in methods}
    else:
        summaries = {m: load_run(out / m) for m in methods}
    rows = comparison_rows(summaries)
    result = {"preset": preset, "machine": machine_description(), "overrides": overrides, "rows": rows}
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    (out / "comparison.md").write_text(f"Preset `{preset}` on {result['machine']}\n\n{markdown_table(rows)}\n")
    plot_accuracy_vs_time(summaries, out / "comparison_accuracy_vs_time.png")
    print(markdown_table(rows))
    return result


def sweep(preset: str, out: Path, overrides: list[str], num_supernodes: int) -> None:
    lines = ["| partition | " + " | ".join(f"{m} acc" for m in METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    table = []
    for partitioner, alpha in SWEEP:
        name = "iid" if partitioner == "iid" else f"dirichlet-{alpha}"
        extra = overrides + [f'partitioner="{partitioner}" dirichlet-alpha={alpha}']
        result = compare(preset, out / name, extra, num_supernodes)
        accs = {r["method"]: r["final_test_accuracy"] for r in result["rows"]}
        lines.append(f"| {name} | " + " | ".join(_fmt(accs[m]) for m in METHODS) + " |")
        table.append({"partition": name, **accs})
    (out / "sweep.json").write_text(json.dumps({"preset": preset, "machine": machine_description(), "rows": table}, indent=2))
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10-cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("-c", "--run-config", action="append", default=[], help="extra overrides for every method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sweep", action="store_true", help="Dirichlet 0.1 / 0.5 / 1.0 and IID, all methods")
    parser.add_argument("--tables-only", action="store_true", help="rebuild table, JSON and plot from the runs already in --out")
    args = parser.parse_args(argv)
    out = (args.out or ROOT / "benchmarks" / "results" / (f"{args.preset}-sweep" if args.sweep else args.preset)).resolve()
    if args.sweep:
        sweep(args.preset, out, args.run_config, args.num_supernodes)
    else:
        compare(args.preset, out, args.run_config, args.num_supernodes, tuple(args.methods.split(",")), rerun=not args.tables_only)


if __name__ == "__main__":
    main()
