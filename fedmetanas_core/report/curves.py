"""Figures of a run's curves: test accuracy and loss per round and over time, the temperature
schedule, and the per-client personalization bars."""

from __future__ import annotations

import math
from pathlib import Path

from .canvas import PHASE_COLORS, FigureSkipped, new_figure, phase_spans, run_title, save_figure, time_axis
from .format import format_accuracy, number
from .load import RunData, series


def _accuracy_figure(data: RunData, path: Path, x: str) -> None:
    from matplotlib.ticker import MaxNLocator

    pts = series(data.rounds)
    if not pts:
        raise ValueError("rounds.jsonl has no readable rounds")
    fig = new_figure(path.name)
    ax_acc, ax_loss = fig.subplots(2, 1, sharex=True)
    scale, xlabel = (1.0, "server round (all phases)") if x == "step" else time_axis(pts)
    phases = list(dict.fromkeys(p["phase"] for p in pts))
    for phase in phases:
        rows = [p for p in pts if p["phase"] == phase]
        xs = [p[x] / scale for p in rows]
        color = PHASE_COLORS.get(phase)
        what = "derived network" if phase == "search" else "network"
        ax_acc.plot(
            xs,
            [number(p.get("accuracy")) for p in rows],
            "o-",
            ms=3,
            color=color,
            label=f"{phase}: test accuracy ({what})",
        )
        ax_loss.plot(
            xs, [number(p.get("loss")) for p in rows], "o-", ms=3, color=color, label=f"{phase}: test loss ({what})"
        )
        if any("supernet-accuracy" in p for p in rows):
            ax_acc.plot(
                xs,
                [number(p.get("supernet-accuracy")) for p in rows],
                "s--",
                ms=3,
                color=color,
                alpha=0.6,
                label=f"{phase}: supernet accuracy",
            )
        if any("supernet-loss" in p for p in rows):
            ax_loss.plot(
                xs,
                [number(p.get("supernet-loss")) for p in rows],
                "s--",
                ms=3,
                color=color,
                alpha=0.6,
                label=f"{phase}: supernet loss",
            )
    final = number((data.summary or {}).get("final_test_accuracy"))
    if not math.isnan(final):
        ax_acc.axhline(final, color="0.4", ls=":", lw=1, label=f"final test accuracy {format_accuracy(final)}")
    for ax in (ax_acc, ax_loss):
        phase_spans(ax, [{**p, x: p[x] / scale} for p in pts], x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if x == "step":
        ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax_loss.set_xlim(left=0)
    ax_acc.set_ylabel("accuracy")
    ax_loss.set_ylabel("loss")
    ax_loss.set_xlabel(xlabel)
    ax_acc.set_title(f"{run_title(data)}: test accuracy and loss per {'round' if x == 'step' else 'wall-clock time'}")
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.09, top=0.94, hspace=0.08)
    save_figure(fig, path)


def draw_accuracy_vs_round(data: RunData, path: Path) -> None:
    _accuracy_figure(data, path, "step")


def draw_accuracy_vs_time(data: RunData, path: Path) -> None:
    _accuracy_figure(data, path, "time")


def draw_temperature(data: RunData, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    pts = [p for p in series(data.rounds) if p["phase"] == "search" and "tau" in p]
    if not pts:
        if not data.rounds:
            raise ValueError("rounds.jsonl has no readable rounds")
        raise FigureSkipped("no search phase: no temperature schedule")
    fig = new_figure(path.name)
    ax = fig.subplots()
    xs = [p["round"] for p in pts]
    ax.plot(xs, [number(p["tau"]) for p in pts], "o-", color="tab:red", label="tau (relaxation temperature)")
    cfg = data.config or {}
    for key, ls in (("tau-max", "--"), ("tau-min", ":")):
        if key in cfg and not math.isnan(number(cfg[key])):
            ax.axhline(number(cfg[key]), color="0.5", ls=ls, lw=1, label=f"{key} {number(cfg[key]):g}")
    ax.set_xlabel("search round")
    ax.set_ylabel("tau")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ent = [k for k in ("alpha-entropy-normal", "alpha-entropy-reduce") if any(k in p for p in pts)]
    if ent:
        ax2 = ax.twinx()
        for k, color in zip(ent, ("tab:purple", "tab:brown"), strict=False):
            ax2.plot(xs, [number(p.get(k)) for p in pts], "^--", ms=3, color=color, alpha=0.7, label=k)
        ax2.set_ylabel("mean op-distribution entropy (nats)")
        ax2.set_ylim(bottom=0)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="best")
    ax.set_title(f"{run_title(data)}: temperature per search round")
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.09, top=0.94)
    save_figure(fig, path)


def draw_personalization(data: RunData, path: Path) -> None:
    import numpy as np

    if data.summary is None:
        raise ValueError("summary.json is missing or unreadable")
    clients = data.summary.get("personalized_per_client") or []
    if not clients:
        raise FigureSkipped("no personalization results (fraction-evaluate = 0)")
    clients = sorted(clients, key=lambda c: number(c.get("partition-id")))
    before = [number(c.get("accuracy-before")) for c in clients]
    after = [number(c.get("accuracy-after")) for c in clients]
    fig = new_figure(path.name)
    ax = fig.subplots()
    x = np.arange(len(clients))
    w = 0.38
    b1 = ax.bar(x - w / 2, before, w, color="0.65", label=f"before (mean {format_accuracy(float(np.nanmean(before)))})")
    b2 = ax.bar(
        x + w / 2,
        after,
        w,
        color="tab:blue",
        label=f"after personalization (mean {format_accuracy(float(np.nanmean(after)))})",
    )
    if len(clients) <= 20:
        for bars in (b1, b2):
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    labels = []
    for c in clients:
        pid, n = c.get("partition-id", "?"), c.get("num-examples")
        labels.append(f"{pid}\n(n={n})" if n is not None and len(clients) <= 20 else str(pid))
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlabel("client (partition id, local test examples)")
    ax.set_ylabel("local test accuracy")
    ax.set_ylim(0, 1.1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{run_title(data)}: per-client accuracy before and after personalization")
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.14, top=0.94)
    save_figure(fig, path)
