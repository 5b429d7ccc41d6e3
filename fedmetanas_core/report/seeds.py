"""Runs repeated over seeds: the mean and spread of their figures, and their test accuracy over
wall-clock time as a mean with a ± std band (a comparison benchmark's figure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .canvas import COMPARISON_FIGURE, line_color, new_figure, save_figure, time_axis
from .format import number
from .load import RunData, series


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None]:
    """Mean and (population) standard deviation of the values that are not None; (None, None) when
    none are."""
    import numpy as np

    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return float(np.mean(present)), float(np.std(present))


def over_seeds(rows: list[dict[str, Any]], keys: Iterable[str]) -> dict[str, float | None]:
    """``<key>_mean`` and ``<key>_std`` over the rows (one per seed) of every key; a row without a
    value for a key (None or absent) does not count for it."""
    out: dict[str, float | None] = {}
    for key in keys:
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std(r.get(key) for r in rows)
    return out


def draw_accuracy_over_seeds(runs: Mapping[str, list[RunData]], path: Path) -> None:
    """Each method's test accuracy per round: the mean over its seeds' runs against the mean elapsed
    time at that round, with a ± std band; rounds past the shortest run's last are left out."""
    import numpy as np

    curves = {}
    for method, seed_runs in runs.items():
        logs = [series(r.rounds) for r in seed_runs if r.rounds]
        if not logs:
            continue
        n = min(len(log) for log in logs)
        acc = np.array([[number(p.get("accuracy")) for p in log[:n]] for log in logs])
        t = np.array([[p["time"] for p in log[:n]] for log in logs]).mean(0)
        curves[method] = (t, acc.mean(0), acc.std(0), len(logs))
    if not curves:
        raise ValueError("no run has readable rounds")
    scale, xlabel = time_axis([{"time": x} for t, *_ in curves.values() for x in t])
    fig = new_figure(COMPARISON_FIGURE)
    ax = fig.subplots()
    for k, (method, (t, mean, std, seeds)) in enumerate(curves.items()):
        color = line_color(method, k)
        ax.plot(t / scale, mean, marker=".", color=color, label=f"{method} ({seeds} seeds)")
        ax.fill_between(t / scale, mean - std, mean + std, color=color, alpha=0.2)
    ax.set_xlabel(f"{xlabel}, mean over seeds")
    ax.set_ylabel("test accuracy of the deployed model (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.09, top=0.97)
    save_figure(fig, path)
