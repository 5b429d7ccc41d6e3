"""Accuracy against epsilon: each method without DP, then with server-side fixed-clipping DP at
several noise multipliers, on one preset (default: digits, 10 clients, Dirichlet 0.5).

    python -m benchmarks.privacy --preset digits --seeds 0 --noise 0.3,1,3 --out benchmarks/results/privacy

For each method (its budget is the preset's ``[method]`` table, as in ``benchmarks.compare``) the
run without DP comes first; its logged update norms (``update-norms`` in rounds.jsonl: every usable
reply's L2 distance to the global model) choose the clipping norm: their median over the run
(the quantile Andrew et al. track by default), so about half the updates are clipped. Then
``dp = "server-fixed"`` at each noise multiplier with that norm. epsilon is the run's own
``dp_epsilon`` (dp-accounting's RDP accountant, delta = dp-delta).

One process per method can share ``--out`` (``--methods fednas`` in one, ``--methods
fedmetanas,fedavg`` in another): the outputs are rebuilt from every finished run on disk.
Runs are the real ServerApp loop and ClientApp (with its DP mods) in this process through
``harness.local_grid.LocalGrid``: no Ray, no SuperLink, the same code as ``fedmetanas run``
minus the transport (cheaper on a busy 2-core machine). A finished run (summary.json present) is
not run again; the table, JSON and plot are rewritten after every run, so a partial grid is
readable. Writes ``privacy.json``, ``privacy.md`` and ``privacy_accuracy_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from fedmetanas_core.run.outputs import machine_description
from fedmetanas_core.util.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fedmetanas", "fednas", "fedavg")
LAST_ROUNDS = 5


def preset_config(preset: str, method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset's flat config for ``method`` (its ``[method]`` table applied), plus overrides."""
    from fedmetanas_core.run.config import defaults, resolve_method_tables
    from harness.cli import parse_run_config

    flat = resolve_method_tables({**parse_run_config([str(ROOT / "conf" / f"{preset}.toml")]), "method": method})
    return {**defaults(), **flat, **overrides}


def run_one(flat: dict[str, Any], out: Path, num_nodes: int) -> dict[str, Any] | None:
    """One run in this process; returns its summary (an existing finished run is reused; None when
    another live process holds the run's lock file)."""
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    import shutil

    from fedmetanas_core.method.training import run_settings
    from fedmetanas_core.run.config import RunConfig
    from harness.local_grid import LocalGrid, task_identity
    from server_app.app import run_experiment

    lock = out.parent / f".{out.name}.running"
    if lock.is_file() and _alive(int(lock.read_text() or 0)):
        print(f"{out}: another process is running it; skipped", flush=True)
        return None
    if out.exists():
        shutil.rmtree(out)  # an unfinished run: start it again
    out.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    cfg = RunConfig.from_flat({**flat, "results-dir": str(out)})
    t0 = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] run {out.relative_to(out.parents[2])}", flush=True)
    with task_identity(), run_settings(cfg, 1):
        run_experiment(LocalGrid(abs(hash(str(out))) % 10**6 + 1, dict(cfg), num_nodes), cfg)
    print(f"[{time.strftime('%H:%M:%S')}] done in {time.time() - t0:.0f} s", flush=True)
    lock.unlink(missing_ok=True)
    return json.loads((out / "summary.json").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def rounds(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]


def clipping_norm_from(out: Path) -> dict[str, float]:
    """The median (and quartiles) of every usable reply's update norm in a run without DP."""
    norms = [n for r in rounds(out) for n in (r.get("update-norms") or [])]
    if not norms:
        raise SystemExit(f"{out}: rounds.jsonl has no update-norms to choose a clipping norm from")
    q = statistics.quantiles(norms, n=4)
    return {"median": statistics.median(norms), "q1": q[0], "q3": q[2], "max": max(norms), "n": len(norms)}


def row(method: str, seed: int, z: float | None, summary: dict[str, Any], out: Path) -> dict[str, Any]:
    accs = [r["accuracy"] for r in rounds(out) if r.get("accuracy") is not None]
    dp = summary.get("dp") or {}
    return {
        "method": method,
        "seed": seed,
        "noise_multiplier": z,
        "epsilon": summary.get("dp_epsilon"),
        "delta": dp.get("delta"),
        "clipping_norm": dp.get("clipping_norm"),
        "releases": dp.get("releases"),
        "final_test_accuracy": summary["final_test_accuracy"],
        "last5_accuracy": statistics.fmean(accs[-LAST_ROUNDS:]) if accs else None,
        "personalized_accuracy": summary.get("personalized_accuracy"),
        "total_time_s": summary.get("total_time_s"),
        "results_dir": str(out),
    }


def markdown(rows: list[dict[str, Any]], norms: dict[str, dict[str, float]], args) -> str:
    lines = [
        "| method | noise multiplier z | clipping norm C | epsilon (delta=1e-5) | final test acc | last-5-rounds "
        "acc | personalized acc |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(
        rows,
        key=lambda r: (
            order.get(r["method"], 9),
            r["seed"],
            -1 if r["noise_multiplier"] is None else r["noise_multiplier"],
        ),
    ):
        z = "no DP" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}"
        eps = "-" if r["noise_multiplier"] is None else ("inf" if r["epsilon"] is None else f"{r['epsilon']:.1f}")
        c = "-" if r["clipping_norm"] is None else f"{r['clipping_norm']:.3g}"
        pers = "-" if r["personalized_accuracy"] is None else f"{r['personalized_accuracy']:.3f}"
        lines.append(
            f"| {r['method']} | {z} | {c} | {eps} | {r['final_test_accuracy']:.3f} | {r['last5_accuracy']:.3f} | "
            f"{pers} |"
        )
    lines.append("")
    lines.append(
        "Clipping norm per method: the median of the update norms logged by its run without DP "
        "(quartiles / max / replies): "
        + "; ".join(
            f"{m}: median {v['median']:.3g} (q1 {v['q1']:.3g}, q3 {v['q3']:.3g}, max {v['max']:.3g}, {v['n']} replies)"
            for m, v in norms.items()
        )
    )
    lines.append(
        f"Seeds: {', '.join(map(str, args.seeds))} "
        f"({'one seed' if len(args.seeds) == 1 else 'one row per seed above; mean and std over the seeds below'})."
    )
    summary = over_seeds(rows)
    if any(g["seeds"] > 1 for g in summary):
        lines += [
            "",
            "| method | noise multiplier z | seeds | epsilon (delta=1e-5) | final test acc (mean +- std) | "
            "last-5-rounds acc (mean +- std) |",
            "|---|---|---|---|---|---|",
        ]
        for g in summary:
            z = "no DP" if g["noise_multiplier"] is None else f"{g['noise_multiplier']:g}"
            eps = "-" if g["epsilon"] is None else f"{g['epsilon']:.1f}"
            lines.append(
                f"| {g['method']} | {z} | {g['seeds']} | {eps} | {g['final_mean']:.3f} +- {g['final_std']:.3f} "
                f"| {g['last5_mean']:.3f} +- {g['last5_std']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and noise level: mean and std over the seeds (std 0 for one seed)."""
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["noise_multiplier"]), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    out = []
    for (method, z), rs in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 9), -1 if kv[0][1] is None else kv[0][1])
    ):
        final = [r["final_test_accuracy"] for r in rs]
        last5 = [r["last5_accuracy"] for r in rs]
        out.append(
            {
                "method": method,
                "noise_multiplier": z,
                "seeds": len(rs),
                "epsilon": rs[0]["epsilon"] if z is not None else None,
                "final_mean": statistics.fmean(final),
                "final_std": statistics.stdev(final) if len(rs) > 1 else 0.0,
                "last5_mean": statistics.fmean(last5),
                "last5_std": statistics.stdev(last5) if len(rs) > 1 else 0.0,
            }
        )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups = over_seeds(rows)  # mean over seeds, error bars: std
    for i, method in enumerate(METHODS):
        dp = sorted(
            (g for g in groups if g["method"] == method and g["epsilon"] is not None), key=lambda g: g["epsilon"]
        )
        ref = [g for g in groups if g["method"] == method and g["noise_multiplier"] is None]
        color = f"C{i}"
        if dp:
            ax.errorbar(
                [g["epsilon"] for g in dp],
                [g["final_mean"] for g in dp],
                yerr=[g["final_std"] for g in dp],
                fmt="o-",
                color=color,
                capsize=3,
                label=f"{method} (server-side fixed clipping; {dp[0]['seeds']} seed(s))",
            )
            for g in dp:
                ax.annotate(
                    f"z={g['noise_multiplier']:g}",
                    (g["epsilon"], g["final_mean"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        for g in ref:
            ax.axhline(g["final_mean"], color=color, ls="--", lw=1, label=f"{method} without DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon at delta = 1e-5 (RDP accountant; log scale)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("digits, 10 clients, Dirichlet 0.5: accuracy against privacy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect(out_dir: Path, seeds: list[int]) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Every finished run under ``out_dir`` (one process per method may share the folder)."""
    rows: list[dict[str, Any]] = []
    norms: dict[str, dict[str, float]] = {}
    for seed in seeds:
        for method in METHODS:
            for run in sorted((out_dir / f"seed-{seed}" / method).glob("*/summary.json")):
                out = run.parent
                z = None if out.name == "no-dp" else float(out.name[1:])
                if z is None:
                    norms[f"{method} seed {seed}"] = clipping_norm_from(out)
                rows.append(row(method, seed, z, json.loads(run.read_text()), out))
    return rows, norms


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    p.add_argument("--noise", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 1.0, 3.0])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "privacy")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    common = {
        "num-partitions": args.clients,
        "min-available-nodes": args.clients,
        "min-train-nodes": args.clients,
        "tensorboard": False,
        "dp-delta": args.delta,
    }

    def write() -> None:
        rows, norms = collect(args.out, args.seeds)
        payload = {
            "preset": args.preset,
            "clients": args.clients,
            "seeds": args.seeds,
            "noise": args.noise,
            "dp": "server-fixed",
            "clipping_norms": norms,
            "rows": rows,
            "machine": machine_description(),
        }
        atomic_write_text(args.out / "privacy.json", json.dumps(payload, indent=2) + "\n")
        atomic_write_text(args.out / "privacy.md", markdown(rows, norms, args))
        plot(rows, args.out / "privacy_accuracy_vs_epsilon.png")

    for seed in args.seeds:
        for method in args.methods:  # the run without DP first: it chooses C; then each noise level
            ref = args.out / f"seed-{seed}" / method / "no-dp"
            if run_one(preset_config(args.preset, method, {**common, "seed": seed}), ref, args.clients) is None:
                continue  # the reference is another process's: its clipping norm is not known yet
            clip = clipping_norm_from(ref)["median"]
            write()
            for z in args.noise:
                flat = {
                    **common,
                    "seed": seed,
                    "dp": "server-fixed",
                    "dp-noise-multiplier": z,
                    "dp-clipping-norm": clip,
                }
                run_one(
                    preset_config(args.preset, method, flat),
                    args.out / f"seed-{seed}" / method / f"z{z:g}",
                    args.clients,
                )
                write()
    write()
    print((args.out / "privacy.md").read_text())


if __name__ == "__main__":
    main()
