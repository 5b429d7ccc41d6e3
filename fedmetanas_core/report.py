"""Figures and Markdown reports rebuilt from a run's files (never a rerun), and optional TensorBoard logging.

    python -m fedmetanas_core.report RUN_DIR [RUN_DIR ...] [--out comparison_report.md] [--refresh]
    python -m fedmetanas_core.report path/to/comparison.json [--out ...]

``write_run_figures(results_dir)`` draws the PNGs next to ``summary.json``; every figure is drawn on
its own, so one that fails (bad data, a missing key) never stops the others: its error goes to
``figures_errors.txt``. A figure that does not apply to the run (no search phase, so no temperature,
heatmap or cell) is skipped without an error. Figures are drawn with matplotlib's object API (no
pyplot, no global backend switch), so drawing from the ServerApp's thread is safe.

Read from ``rounds.jsonl`` (one object per round): ``phase``, ``round``, ``accuracy``, ``loss``,
``supernet-accuracy``, ``supernet-loss``, ``tau``, ``elapsed-s``, ``alpha-entropy-normal``,
``alpha-entropy-reduce`` and, for the heatmaps, per search round: ``op-probs`` (``{"normal":
[[p per op] per edge], "reduce": ...}``), ``primitives`` (op names) and ``edges`` (``"2<-0"``, ...).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

logger = logging.getLogger(__name__)

DPI = 100
# Every figure a run can have, with its size in pixels (fixed: figures are saved without tight bbox).
FIGURE_SIZES: dict[str, tuple[int, int]] = {
    "accuracy_vs_round.png": (900, 600),
    "accuracy_vs_time.png": (900, 600),
    "temperature.png": (900, 600),
    "alpha_heatmap_normal.png": (1200, 600),
    "alpha_heatmap_reduce.png": (1200, 600),
    "cell_normal.png": (1000, 500),
    "cell_reduce.png": (1000, 500),
    "personalization.png": (900, 600),
}
FIGURES = tuple(FIGURE_SIZES)
COMPARISON_FIGURE = "comparison_accuracy_vs_time.png"
COMPARISON_FIGURE_SIZE = (900, 600)
ERRORS_FILE = "figures_errors.txt"
REPORT_FILE = "report.md"
DEFAULT_COMPARISON_OUT = "comparison_report.md"

# rounds.jsonl keys that carry the per-edge op probabilities (search rounds only).
OP_PROBS_KEY, PRIMITIVES_KEY, EDGES_KEY = "op-probs", "primitives", "edges"

_PHASE_COLORS = {"search": "tab:blue", "retrain": "tab:orange", "fedavg": "tab:green"}
_METHOD_COLORS = {"fedmetanas": "tab:blue", "fednas": "tab:orange", "fedavg": "tab:green"}


class FigureSkipped(Exception):
    """The figure does not apply to this run (e.g. a FedAvg run has no cell): no file, no error."""


# ---------------------------------------------------------------------------------------------
# Reading a run


@dataclass
class RunData:
    dir: Path
    summary: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    genotype: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)  # what could not be read, for the errors file

    @property
    def method(self) -> str:
        return str((self.summary or {}).get("method") or (self.config or {}).get("method") or "?")

    @property
    def dataset(self) -> str:
        return str((self.summary or {}).get("dataset") or (self.config or {}).get("dataset") or "?")


def load_rounds(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of ``rounds.jsonl`` in order, and a note for every line that is not a JSON object.

    Duplicated (phase, round) pairs (a resumed run re-logging a round) keep the last line. Phases keep
    the order in which they first appear; rows within a phase are sorted by round.
    """
    path = Path(path)
    problems: list[str] = []
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    phase_order: list[str] = []
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path.name} line {n}: not JSON ({exc.msg}); line skipped")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path.name} line {n}: not a JSON object; line skipped")
                continue
            phase = str(row.get("phase", "?"))
            try:
                rnd = int(row.get("round", len(by_key) + 1))
            except (TypeError, ValueError):
                problems.append(f"{path.name} line {n}: bad round {row.get('round')!r}; line skipped")
                continue
            if phase not in phase_order:
                phase_order.append(phase)
            by_key[(phase, rnd)] = {**row, "phase": phase, "round": rnd}
    rows = sorted(by_key.values(), key=lambda r: (phase_order.index(r["phase"]), r["round"]))
    return rows, problems


def load_run(results_dir: str | Path) -> RunData:
    """Everything the figures and the report need; never raises for missing or broken files."""
    d = Path(results_dir)
    data = RunData(d)
    for name, attr, parse in (
        ("summary.json", "summary", json.loads),
        ("config.yaml", "config", yaml.safe_load),
    ):
        p = d / name
        if not p.exists():
            data.problems.append(f"{name}: missing")
            continue
        try:
            value = parse(p.read_text())
            if not isinstance(value, dict):
                raise ValueError("not a mapping")
            setattr(data, attr, value)
        except Exception as exc:
            data.problems.append(f"{name}: unreadable ({type(exc).__name__}: {exc})")
    p = d / "rounds.jsonl"
    if p.exists():
        try:
            data.rounds, problems = load_rounds(p)
            data.problems += problems
        except OSError as exc:
            data.problems.append(f"rounds.jsonl: unreadable ({exc})")
    else:
        data.problems.append("rounds.jsonl: missing")
    genotype = (data.summary or {}).get("genotype")
    if genotype is None and (d / "genotype.yaml").exists():
        try:
            genotype = yaml.safe_load((d / "genotype.yaml").read_text())
        except Exception as exc:
            data.problems.append(f"genotype.yaml: unreadable ({type(exc).__name__}: {exc})")
    data.genotype = genotype if isinstance(genotype, dict) else None
    return data


def _num(value: Any) -> float:
    """A finite float, or NaN (for None, strings, inf)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _series(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``step`` (round counted over all phases) and a non-decreasing ``time`` (elapsed-s)."""
    out, offset, last = [], 0.0, None
    for i, row in enumerate(rows, start=1):
        t = _num(row.get("elapsed-s"))
        if not math.isnan(t):
            if last is not None and t + offset < last:  # the clock restarted (resumed run): keep counting
                offset = last
            t += offset
            last = t
        out.append({**row, "step": i, "time": t})
    return out


# ---------------------------------------------------------------------------------------------
# Figures


def _figure(name: str):
    from matplotlib.figure import Figure

    w, h = FIGURE_SIZES.get(name, COMPARISON_FIGURE_SIZE) if name != COMPARISON_FIGURE else COMPARISON_FIGURE_SIZE
    return Figure(figsize=(w / DPI, h / DPI), dpi=DPI)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": the pixel size stays fixed
    _atomic_write(path, buf.getvalue())


def _title(data: RunData) -> str:
    return f"{data.method} on {data.dataset}"


def _phase_spans(ax, pts: list[dict[str, Any]], key: str) -> None:
    """Shade and name the phases when a run has more than one (FedNAS: search, then retrain)."""
    phases = list(dict.fromkeys(p["phase"] for p in pts))
    if len(phases) < 2:
        return
    for k, phase in enumerate(phases):
        xs = [p[key] for p in pts if p["phase"] == phase and not math.isnan(p[key])]
        if xs and k % 2 == 1:
            ax.axvspan(min(xs), max(xs), color="0.93", zorder=0)


def _time_axis(pts: list[dict[str, Any]]) -> tuple[float, str]:
    top = max((p["time"] for p in pts if not math.isnan(p["time"])), default=0.0)
    return (60.0, "elapsed wall-clock time (min)") if top > 600 else (1.0, "elapsed wall-clock time (s)")


def _accuracy_figure(data: RunData, path: Path, x: str) -> None:
    from matplotlib.ticker import MaxNLocator

    pts = _series(data.rounds)
    if not pts:
        raise ValueError("rounds.jsonl has no readable rounds")
    fig = _figure(path.name)
    ax_acc, ax_loss = fig.subplots(2, 1, sharex=True)
    scale, xlabel = (1.0, "server round (all phases)") if x == "step" else _time_axis(pts)
    phases = list(dict.fromkeys(p["phase"] for p in pts))
    for phase in phases:
        rows = [p for p in pts if p["phase"] == phase]
        xs = [p[x] / scale for p in rows]
        color = _PHASE_COLORS.get(phase)
        what = "derived network" if phase == "search" else "network"
        ax_acc.plot(xs, [_num(p.get("accuracy")) for p in rows], "o-", ms=3, color=color, label=f"{phase}: test accuracy ({what})")
        ax_loss.plot(xs, [_num(p.get("loss")) for p in rows], "o-", ms=3, color=color, label=f"{phase}: test loss ({what})")
        if any("supernet-accuracy" in p for p in rows):
            ax_acc.plot(xs, [_num(p.get("supernet-accuracy")) for p in rows], "s--", ms=3, color=color, alpha=0.6, label=f"{phase}: supernet accuracy")
        if any("supernet-loss" in p for p in rows):
            ax_loss.plot(xs, [_num(p.get("supernet-loss")) for p in rows], "s--", ms=3, color=color, alpha=0.6, label=f"{phase}: supernet loss")
    final = _num((data.summary or {}).get("final_test_accuracy"))
    if not math.isnan(final):
        ax_acc.axhline(final, color="0.4", ls=":", lw=1, label=f"final test accuracy {format_accuracy(final)}")
    for ax in (ax_acc, ax_loss):
        _phase_spans(ax, [{**p, x: p[x] / scale} for p in pts], x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if x == "step":
        ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax_loss.set_xlim(left=0)
    ax_acc.set_ylabel("accuracy")
    ax_loss.set_ylabel("loss")
    ax_loss.set_xlabel(xlabel)
    ax_acc.set_title(f"{_title(data)}: test accuracy and loss per {'round' if x == 'step' else 'wall-clock time'}")
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.09, top=0.94, hspace=0.08)
    _save(fig, path)


def _fig_accuracy_vs_round(data: RunData, path: Path) -> None:
    _accuracy_figure(data, path, "step")


def _fig_accuracy_vs_time(data: RunData, path: Path) -> None:
    _accuracy_figure(data, path, "time")


def _fig_temperature(data: RunData, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    pts = [p for p in _series(data.rounds) if p["phase"] == "search" and "tau" in p]
    if not pts:
        if not data.rounds:
            raise ValueError("rounds.jsonl has no readable rounds")
        raise FigureSkipped("no search phase: no temperature schedule")
    fig = _figure(path.name)
    ax = fig.subplots()
    xs = [p["round"] for p in pts]
    ax.plot(xs, [_num(p["tau"]) for p in pts], "o-", color="tab:red", label="tau (relaxation temperature)")
    cfg = data.config or {}
    for key, ls in (("tau-max", "--"), ("tau-min", ":")):
        if key in cfg and not math.isnan(_num(cfg[key])):
            ax.axhline(_num(cfg[key]), color="0.5", ls=ls, lw=1, label=f"{key} {_num(cfg[key]):g}")
    ax.set_xlabel("search round")
    ax.set_ylabel("tau")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ent = [k for k in ("alpha-entropy-normal", "alpha-entropy-reduce") if any(k in p for p in pts)]
    if ent:
        ax2 = ax.twinx()
        for k, color in zip(ent, ("tab:purple", "tab:brown")):
            ax2.plot(xs, [_num(p.get(k)) for p in pts], "^--", ms=3, color=color, alpha=0.7, label=k)
        ax2.set_ylabel("mean op-distribution entropy (nats)")
        ax2.set_ylim(bottom=0)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="best")
    ax.set_title(f"{_title(data)}: temperature per search round")
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.09, top=0.94)
    _save(fig, path)


def _op_prob_rows(data: RunData, cell_type: str) -> list[dict[str, Any]]:
    search = [r for r in data.rounds if r["phase"] == "search"]
    if not search:
        if not data.rounds:
            raise ValueError("rounds.jsonl has no readable rounds")
        raise FigureSkipped("no search phase: no architecture probabilities")
    rows = [r for r in search if isinstance(r.get(OP_PROBS_KEY), dict) and cell_type in r[OP_PROBS_KEY]]
    if not rows:
        raise ValueError(f"no search round in rounds.jsonl has '{OP_PROBS_KEY}' for the {cell_type} cell")
    return rows


def _fig_alpha_heatmap(data: RunData, path: Path, cell_type: str) -> None:
    import numpy as np

    rows = _op_prob_rows(data, cell_type)
    last = rows[-1]
    primitives = [str(p) for p in last.get(PRIMITIVES_KEY) or []]
    edges = [str(e) for e in last.get(EDGES_KEY) or []]
    picks = sorted({round(i) for i in np.linspace(0, len(rows) - 1, min(4, len(rows)))})
    mats = []
    for i in picks:
        m = np.asarray(rows[i][OP_PROBS_KEY][cell_type], dtype=float)
        if m.ndim != 2:
            raise ValueError(f"round {rows[i]['round']}: {OP_PROBS_KEY}[{cell_type}] is not an edges x ops matrix")
        mats.append(m)
    n_edges, n_ops = mats[-1].shape
    if any(m.shape != (n_edges, n_ops) for m in mats):
        raise ValueError(f"{OP_PROBS_KEY}[{cell_type}] changes shape between rounds")
    if len(primitives) != n_ops:
        raise ValueError(f"'{PRIMITIVES_KEY}' has {len(primitives)} names for {n_ops} op columns")
    if len(edges) != n_edges:
        edges = [f"edge {e}" for e in range(n_edges)]
    chosen = _chosen_cells(data.genotype, cell_type, edges, primitives)
    vmax = max(float(np.nanmax(m)) for m in mats) or 1.0
    fig = _figure(path.name)
    axes = fig.subplots(1, len(mats), sharey=True, squeeze=False)[0]
    annotate = n_edges * n_ops <= 120
    im = None
    for ax, i, m in zip(axes, picks, mats):
        r = rows[i]
        im = ax.imshow(m, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_xticks(range(n_ops), primitives, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n_edges), edges, fontsize=8)
        tau = _num(r.get("tau"))
        ax.set_title(f"round {r['round']}" + ("" if math.isnan(tau) else f" (tau {tau:.2f})"), fontsize=10)
        if annotate and i == picks[-1]:  # values on the last round only (colours tell the rest)
            for e in range(n_edges):
                for o in range(n_ops):
                    v = m[e, o]
                    ax.text(o, e, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 * vmax else "black")
        if i == picks[-1]:
            from matplotlib.patches import Rectangle

            for e, o in chosen:
                ax.add_patch(Rectangle((o - 0.5, e - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    axes[0].set_ylabel("edge (node <- input)")
    fig.subplots_adjust(left=0.07, right=0.89, bottom=0.25, top=0.88, wspace=0.08)
    fig.colorbar(im, cax=fig.add_axes((0.91, 0.25, 0.015, 0.63)), label="op probability (softmax of alpha)")
    note = "; red boxes: ops of the derived genotype" if chosen else ""
    fig.suptitle(f"{_title(data)}: {cell_type} cell op probabilities per edge{note}", fontsize=11)
    _save(fig, path)


def _chosen_cells(genotype: dict | None, cell_type: str, edges: list[str], primitives: list[str]) -> list[tuple[int, int]]:
    out = []
    try:
        for k, node in enumerate((genotype or {}).get(cell_type) or []):
            for choice in node:
                label = f"{k + 2}<-{int(choice['input'])}"
                if label in edges and choice["op"] in primitives:
                    out.append((edges.index(label), primitives.index(choice["op"])))
    except (TypeError, KeyError, ValueError):
        return []
    return out


def _node_name(i: int, mathtext: bool = True) -> str:
    if i == 0:
        return r"$c_{k-2}$" if mathtext else "c_{k-2}"
    if i == 1:
        return r"$c_{k-1}$" if mathtext else "c_{k-1}"
    return str(i - 2)


def _arc_point(p1: tuple[float, float], p2: tuple[float, float], rad: float, t: float) -> tuple[float, float]:
    """Point at ``t`` on matplotlib's ``arc3,rad=rad`` curve from p1 to p2 (equal aspect: data = display)."""
    (x1, y1), (x2, y2) = p1, p2
    cx, cy = (x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1)
    u = 1 - t
    return u * u * x1 + 2 * u * t * cx + t * t * x2, u * u * y1 + 2 * u * t * cy + t * t * y2


def _fig_cell(data: RunData, path: Path, cell_type: str) -> None:
    if data.genotype is None:
        raise FigureSkipped("no genotype (a fixed network: FedAvg baseline)")
    nodes = data.genotype.get(cell_type)
    if not isinstance(nodes, list) or not nodes:
        raise ValueError(f"genotype has no {cell_type} cell")
    n = len(nodes)
    # Left to right: the inputs above and below on the left, the intermediate nodes on a line, the output
    # on the right. Input edges fan out straight; longer edges between intermediate nodes arc high above
    # the line and the concatenation into the output arcs below it, so no edge runs through a node.
    gap = 2.0
    pos = {0: (0.0, 2.0), 1: (0.0, -2.0)}
    for k in range(n):
        pos[k + 2] = (gap * (k + 1), 0.0)
    out_id = n + 2
    pos[out_id] = (gap * (n + 1), 0.0)
    fig = _figure(path.name)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.88))
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_xlim(-0.9, pos[out_id][0] + 0.9)
    ax.set_ylim(-2.6, 2.6)
    ops = sorted({str(c["op"]) for node in nodes for c in node})
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
    colors = {op: palette[i % len(palette)] for i, op in enumerate(ops)}
    box = dict(boxstyle="round,pad=0.4", lw=1.2)
    for i, (x, y) in pos.items():
        if i < 2:
            style = dict(box, fc="#cfe8ff", ec="tab:blue")
        elif i == out_id:
            style = dict(box, fc="#ffe3c4", ec="tab:orange")
        else:
            style = dict(box, fc="#f2f2f2", ec="0.3")
        label = r"$c_{k}$" if i == out_id else _node_name(i)
        ax.text(x, y, label, ha="center", va="center", fontsize=13, bbox=style, zorder=3)

    def arrow(src: int, dst: int, rad: float, color, **style) -> None:
        ax.annotate("", xy=pos[dst], xytext=pos[src], zorder=style.pop("zorder", 2),
                    arrowprops=dict(arrowstyle="-|>", color=color, shrinkA=16, shrinkB=16,
                                    connectionstyle=f"arc3,rad={rad}", **style))  # fmt: skip

    for k, node in enumerate(nodes):
        dst = k + 2
        for j, choice in enumerate(node):
            src, op = int(choice["input"]), str(choice["op"])
            if src < 0 or src >= dst:
                raise ValueError(f"{cell_type} node {k}: input {src} is not an earlier node")
            span = abs(pos[dst][0] - pos[src][0])
            if src < 2:
                rad = 0.0
            else:  # above the line, higher for longer jumps
                rad = 0.0 if dst - src == 1 else -2 * (1.2 + 0.25 * (dst - src - 2)) / span
            if len(node) > 1 and sum(int(c["input"]) == src for c in node) > 1:
                rad += 0.15 if j == 0 else -0.15  # the same input twice: bend the two apart
            arrow(src, dst, rad, colors[op], lw=1.8)
            # Input edges: label nearer the target, so labels of one input's fan do not collide.
            t = min(0.7, max(0.5, 1 - 1.5 / math.dist(pos[src], pos[dst]))) if src < 2 else 0.5
            mx, my = _arc_point(pos[src], pos[dst], rad, t)
            ax.text(mx, my, op, ha="center", va="center", fontsize=8, color=colors[op],
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85), zorder=4)  # fmt: skip
    for k in range(n):
        span = pos[out_id][0] - pos[k + 2][0]
        rad = 0.0 if k == n - 1 else 2 * (0.3 + 0.12 * (n - 2 - k)) / span  # below the line
        arrow(k + 2, out_id, rad, "0.6", lw=1, ls="--", zorder=1)
    fig.suptitle(f"{_title(data)}: derived {cell_type} cell ({n} nodes; dashed: concatenation into the output)", fontsize=11)
    _save(fig, path)


def _fig_personalization(data: RunData, path: Path) -> None:
    import numpy as np

    if data.summary is None:
        raise ValueError("summary.json is missing or unreadable")
    clients = data.summary.get("personalized_per_client") or []
    if not clients:
        raise FigureSkipped("no personalization results (fraction-evaluate = 0)")
    clients = sorted(clients, key=lambda c: _num(c.get("partition-id")))
    before = [_num(c.get("accuracy-before")) for c in clients]
    after = [_num(c.get("accuracy-after")) for c in clients]
    fig = _figure(path.name)
    ax = fig.subplots()
    x = np.arange(len(clients))
    w = 0.38
    b1 = ax.bar(x - w / 2, before, w, color="0.65", label=f"before (mean {format_accuracy(float(np.nanmean(before)))})")
    b2 = ax.bar(x + w / 2, after, w, color="tab:blue", label=f"after personalization (mean {format_accuracy(float(np.nanmean(after)))})")
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
    ax.set_title(f"{_title(data)}: per-client accuracy before and after personalization")
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.14, top=0.94)
    _save(fig, path)


RENDERERS: dict[str, Callable[[RunData, Path], None]] = {
    "accuracy_vs_round.png": _fig_accuracy_vs_round,
    "accuracy_vs_time.png": _fig_accuracy_vs_time,
    "temperature.png": _fig_temperature,
    "alpha_heatmap_normal.png": lambda d, p: _fig_alpha_heatmap(d, p, "normal"),
    "alpha_heatmap_reduce.png": lambda d, p: _fig_alpha_heatmap(d, p, "reduce"),
    "cell_normal.png": lambda d, p: _fig_cell(d, p, "normal"),
    "cell_reduce.png": lambda d, p: _fig_cell(d, p, "reduce"),
    "personalization.png": _fig_personalization,
}


@dataclass
class FigureResult:
    written: list[Path] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # figure -> message
    skipped: dict[str, str] = field(default_factory=dict)  # figure -> why it does not apply
    problems: list[str] = field(default_factory=list)  # input files that were missing or partly unreadable


def render_run_figures(results_dir: str | Path, names: list[str] | tuple[str, ...] | None = None) -> FigureResult:
    """Draw ``names`` (default: every figure) from the run's files; never raises.

    Errors, one ``name: message`` line each, go to ``figures_errors.txt`` after the input-file problems
    (missing files, corrupt rounds.jsonl lines); the file is removed when a redraw finds none.
    """
    d = Path(results_dir)
    result = FigureResult()
    names = list(FIGURES if names is None else names)
    if not d.is_dir():
        result.errors["results_dir"] = f"{d} is not a directory"
        logger.error("figures: %s is not a directory", d)
        return result
    try:
        data = load_run(d)
    except Exception as exc:  # load_run is tolerant; this is a last guard
        data = RunData(d, problems=[f"reading the run: {type(exc).__name__}: {exc}"])
    for name in names:
        try:
            renderer = RENDERERS[name]
            renderer(data, d / name)
            result.written.append(d / name)
        except FigureSkipped as exc:
            result.skipped[name] = str(exc)
        except Exception as exc:
            result.errors[name] = f"{type(exc).__name__}: {exc}"
            logger.warning("figure %s failed: %s: %s", name, type(exc).__name__, exc)
            logger.debug("%s", traceback.format_exc())
    result.problems = list(data.problems)
    _write_errors(d, result.problems + [f"{name}: {msg}" for name, msg in result.errors.items()])
    return result


def _write_errors(d: Path, lines: list[str]) -> None:
    path = d / ERRORS_FILE
    try:
        if lines:
            _atomic_write(path, ("\n".join(lines) + "\n").encode())
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        logger.error("could not write %s: %s", path, exc)


def write_run_figures(results_dir: str | Path) -> list[Path]:
    """Draw every figure of a run next to its summary.json; returns the PNGs written. Never raises.

    A figure that fails is left out and named, with its error, in ``figures_errors.txt``.
    """
    try:
        return render_run_figures(results_dir).written
    except Exception as exc:  # pragma: no cover - render_run_figures already guards every step
        logger.error("figures failed: %s: %s", type(exc).__name__, exc)
        return []


# ---------------------------------------------------------------------------------------------
# Markdown


def format_number(value: Any, digits: int = 4) -> str:
    v = _num(value)
    return "–" if math.isnan(v) else f"{v:.{digits}f}"


def format_accuracy(value: Any) -> str:
    """How the pages print an accuracy (a fraction, 4 decimals), or "–" when there is none."""
    return format_number(value, 4)


def format_seconds(value: Any) -> str:
    v = _num(value)
    if math.isnan(v):
        return "–"
    if v < 60:
        return f"{v:.1f} s"
    m, s = divmod(round(v), 60)
    h, m = divmod(m, 60)
    return f"{v:.0f} s ({h}h {m:02d}m {s:02d}s)" if h else f"{v:.0f} s ({m}m {s:02d}s)"


def format_count(value: Any) -> str:
    v = _num(value)
    return "–" if math.isnan(v) else f"{int(v):,}"


def _md_link(target: Path | str, start: Path) -> str:
    rel = Path(os.path.relpath(Path(target).resolve(), start.resolve())).as_posix()
    return f"<{rel}>" if " " in rel else rel


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_FIGURE_TITLES = {
    "accuracy_vs_round.png": "Test accuracy and loss per round",
    "accuracy_vs_time.png": "Test accuracy and loss over wall-clock time",
    "temperature.png": "Relaxation temperature per search round",
    "alpha_heatmap_normal.png": "Op probabilities per edge: normal cell",
    "alpha_heatmap_reduce.png": "Op probabilities per edge: reduction cell",
    "cell_normal.png": "Derived normal cell",
    "cell_reduce.png": "Derived reduction cell",
    "personalization.png": "Personalization per client",
}


def _genotype_lines(genotype: dict | None) -> list[str]:
    if genotype is None:
        return ["No searched architecture: this run trains a fixed network."]
    lines = []
    for cell_type in ("normal", "reduce"):
        lines += [f"**{cell_type} cell**", "", "| Node | Inputs (op ← input) |", "|---|---|"]
        for k, node in enumerate(genotype.get(cell_type) or []):
            try:
                parts = [f"`{c['op']}` ← {_node_name(int(c['input']), mathtext=False)}" for c in node]
            except (TypeError, KeyError, ValueError):
                parts = [_md_escape(node)]
            lines.append(f"| {k} | {', '.join(parts)} |")
        lines.append("")
    return lines


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    s = summary
    pers = format_accuracy(s.get("personalized_accuracy"))
    if not math.isnan(_num(s.get("personalized_accuracy_std"))):
        pers += f" ± {_num(s['personalized_accuracy_std']):.4f}"
    return [
        ("Final test accuracy", format_accuracy(s.get("final_test_accuracy"))),
        ("Final test loss", format_number(s.get("final_test_loss"))),
        ("Supernet test accuracy", format_accuracy(s.get("supernet_test_accuracy"))),
        ("Personalized accuracy (after)", pers),
        ("Personalized accuracy (before)", format_accuracy(s.get("personalized_accuracy_before"))),
        ("Search time", format_seconds(s.get("search_time_s"))),
        ("Retrain time", format_seconds(s.get("retrain_time_s"))),
        ("Total time (training)", format_seconds(s.get("total_time_s"))),
        ("Wall time (with personalization)", format_seconds(s.get("wall_time_s"))),
        ("Parameters (final network)", format_count(s.get("params"))),
        ("Parameters (supernet)", format_count(s.get("supernet_params"))),
        ("Rejected replies", format_count(s.get("rejected_replies"))),
    ]


def write_run_report(results_dir: str | Path, refresh: bool = False) -> Path:
    """``report.md`` in the run directory; missing figures (all with ``refresh``) are drawn first."""
    d = Path(results_dir)
    missing = [n for n in FIGURES if refresh or not (d / n).exists()]
    result = render_run_figures(d, missing) if missing else FigureResult()
    data = load_run(d)
    s = data.summary or {}
    out: list[str] = [f"# Run report: {data.method} on {data.dataset}", ""]
    rounds = s.get("rounds", (data.config or {}).get("num-server-rounds", "–"))
    if s.get("retrain_rounds"):
        rounds = f"{rounds} search + {s['retrain_rounds']} retrain"
    meta = [
        ("Results directory", f"`{d}`"),
        ("Method", data.method),
        ("Strategy", s.get("strategy", (data.config or {}).get("strategy", "–"))),
        ("Dataset", data.dataset),
        ("Clients", s.get("num_clients", "–")),
        ("Rounds", rounds),
        ("Seed", s.get("seed", (data.config or {}).get("seed", "–"))),
        ("Machine", s.get("machine", "–")),
    ]  # fmt: skip
    out += [f"- **{k}**: {_md_escape(v)}" for k, v in meta]
    out += ["", "## Results", ""]
    if data.summary is None:
        out += ["`summary.json` is missing or unreadable: no final numbers.", ""]
    else:
        out += ["| Metric | Value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary_rows(s)] + [""]
    out += ["## Genotype", ""] + _genotype_lines(data.genotype)
    out += ["## Figures", ""]
    errors = _read_errors(d)
    for name in FIGURES:
        if (d / name).exists():
            out += [f"### {_FIGURE_TITLES[name]}", "", f"![{_FIGURE_TITLES[name]}]({name})", ""]
    not_drawn = [(n, result.skipped.get(n) or errors.get(n) or "not drawn") for n in FIGURES if not (d / n).exists()]
    if not_drawn:
        out += ["Not drawn:", ""] + [f"- `{n}`: {_md_escape(why)}" for n, why in not_drawn] + [""]
    if errors:
        out += [f"Problems found while drawing (from `{ERRORS_FILE}`):", ""]
        out += [f"- `{k}`: {_md_escape(v)}" for k, v in errors.items()] + [""]
    if data.rounds:
        out += ["## Rounds", "", "| Phase | Round | tau | Test acc. | Supernet acc. | Test loss | Elapsed |", "|---|---|---|---|---|---|---|"]
        for p in _series(data.rounds):
            tau = _num(p.get("tau"))
            out.append(
                f"| {p['phase']} | {p['round']} | {'–' if math.isnan(tau) else f'{tau:.3f}'} | {format_accuracy(p.get('accuracy'))} "
                f"| {format_accuracy(p.get('supernet-accuracy'))} | {format_number(p.get('loss'))} | {format_seconds(p['time'])} |"
            )
        out.append("")
    if data.config:
        out += ["## Configuration", "", "<details><summary>config.yaml</summary>", "", "```yaml",
                yaml.safe_dump(data.config, sort_keys=True).rstrip(), "```", "", "</details>", ""]  # fmt: skip
    if s.get("versions"):
        out += ["## Software", "", ", ".join(f"{k} {v}" for k, v in s["versions"].items()), ""]
    path = d / REPORT_FILE
    _atomic_write(path, "\n".join(out).encode())
    return path


def _read_errors(d: Path) -> dict[str, str]:
    p = d / ERRORS_FILE
    if not p.exists():
        return {}
    errors = {}
    for line in p.read_text(errors="replace").splitlines():
        name, _, msg = line.partition(": ")
        if name:
            errors[name] = msg
    return errors


# ---------------------------------------------------------------------------------------------
# Comparison of runs


@dataclass
class ComparisonRow:
    method: str
    values: dict[str, Any]
    results_dir: Path | None
    data: RunData | None


_COMPARISON_KEYS = (
    "final_test_accuracy", "supernet_test_accuracy", "personalized_accuracy", "search_time_s",
    "retrain_time_s", "total_time_s", "time_to_reach_fednas_accuracy_s", "params",
)  # fmt: skip


def _comparison_from_json(path: Path) -> tuple[dict[str, Any], list[ComparisonRow]]:
    doc = json.loads(path.read_text())
    rows = []
    for r in doc.get("rows") or []:
        d = None
        if r.get("results_dir"):
            for cand in (Path(r["results_dir"]), path.parent / r["results_dir"]):
                if cand.is_dir():
                    d = cand
                    break
        data = load_run(d) if d is not None else None
        values = {k: r[k] for k in _COMPARISON_KEYS if k in r}
        for k in _COMPARISON_KEYS:  # fill what the row lacks from the run's summary
            if k not in values and data is not None and data.summary and k in data.summary:
                values[k] = data.summary[k]
        rows.append(ComparisonRow(str(r.get("method") or (data.method if data else "?")), values, d, data))
    return {k: v for k, v in doc.items() if k != "rows"}, rows


def _comparison_from_dirs(dirs: list[Path]) -> list[ComparisonRow]:
    rows = []
    for d in dirs:
        data = load_run(d)
        s = data.summary or {}
        rows.append(ComparisonRow(data.method, {k: s[k] for k in _COMPARISON_KEYS if k in s}, d, data))
    fednas = next((r for r in rows if r.method == "fednas"), None)
    target = _num(fednas.values.get("final_test_accuracy")) if fednas else math.nan
    if not math.isnan(target):  # first wall-clock second at which each run's test accuracy reached FedNAS's final one
        for r in rows:
            pts = _series(r.data.rounds) if r.data else []
            hit = next((p["time"] for p in pts if _num(p.get("accuracy")) >= target), None)
            r.values["time_to_reach_fednas_accuracy_s"] = hit
    return rows


def _run_labels(rows: list[ComparisonRow]) -> list[str]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.method] = counts.get(r.method, 0) + 1
    return [r.method if counts[r.method] == 1 or r.results_dir is None else f"{r.method} ({r.results_dir.name})" for r in rows]


def _comparison_figure(rows: list[ComparisonRow], path: Path, title: str) -> None:
    plotted = [(lbl, r) for lbl, r in zip(_run_labels(rows), rows) if r.data and r.data.rounds]
    if not plotted:
        raise ValueError("no run has readable rounds")
    all_pts = [p for _, r in plotted for p in _series(r.data.rounds)]
    scale, xlabel = _time_axis(all_pts)
    fig = _figure(COMPARISON_FIGURE)
    ax = fig.subplots()
    palette = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
    for k, (label, r) in enumerate(plotted):
        color = _METHOD_COLORS.get(r.method) if sum(x.method == r.method for _, x in plotted) == 1 else None
        color = color or palette[k % len(palette)]
        pts = _series(r.data.rounds)
        ax.plot([p["time"] / scale for p in pts], [_num(p.get("accuracy")) for p in pts], "o-", ms=3, color=color,
                label=f"{label}: test accuracy (final {format_accuracy(r.values.get('final_test_accuracy'))})")  # fmt: skip
        phases = list(dict.fromkeys(p["phase"] for p in pts))
        for phase in phases[1:]:  # mark where a later phase starts (FedNAS retraining)
            first = next(p for p in pts if p["phase"] == phase)
            ax.axvline(first["time"] / scale, color=color, ls=":", lw=1)
            ax.annotate(f"{label}: {phase} starts", (first["time"] / scale, 0.98), xycoords=("data", "axes fraction"),
                        fontsize=7, color=color, rotation=90, va="top", ha="right")  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_xlim(left=0)
    ax.set_ylabel("test accuracy (derived / final network)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.09, top=0.94)
    _save(fig, path)


def write_comparison_report(rows: list[ComparisonRow], out: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """One Markdown page comparing runs, with ``comparison_accuracy_vs_time.png`` next to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    title = "Comparison: " + " vs ".join(dict.fromkeys(r.method for r in rows))
    lines = [f"# {title}", ""]
    for key in ("preset", "machine"):
        if meta.get(key) is not None:
            lines.append(f"- **{key}**: {_md_escape(meta[key])}")
    datasets = sorted({r.data.dataset for r in rows if r.data})
    if datasets:
        lines.append(f"- **dataset**: {', '.join(datasets)}")
    lines.append("")
    show_ttr = any("time_to_reach_fednas_accuracy_s" in r.values for r in rows)
    head = ["Run", "Method", "Final acc.", "Supernet acc.", "Personalized acc.", "Search time", "Retrain time", "Total time"]
    head += ["Time to FedNAS acc."] if show_ttr else []
    head += ["Params"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in zip(_run_labels(rows), rows):
        v = r.values
        run = _md_escape(r.results_dir.name if r.results_dir else label)
        if r.results_dir is not None and (r.results_dir / REPORT_FILE).exists():
            run = f"[{run}]({_md_link(r.results_dir / REPORT_FILE, out.parent)})"
        cells = [run, _md_escape(r.method), format_accuracy(v.get("final_test_accuracy")),
                 format_accuracy(v.get("supernet_test_accuracy")), format_accuracy(v.get("personalized_accuracy")),
                 format_seconds(v.get("search_time_s")), format_seconds(v.get("retrain_time_s")),
                 format_seconds(v.get("total_time_s"))]  # fmt: skip
        if show_ttr:
            ttr = v.get("time_to_reach_fednas_accuracy_s")
            cells.append("not reached" if ttr is None else format_seconds(ttr))
        cells.append(format_count(v.get("params")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if show_ttr:
        lines += ["*Time to FedNAS acc.*: first elapsed wall-clock time at which the run's test accuracy reached "
                  "FedNAS's final test accuracy.", ""]  # fmt: skip
    fig_path = out.parent / COMPARISON_FIGURE
    try:
        _comparison_figure(rows, fig_path, f"{title}: test accuracy over wall-clock time")
        lines += ["## Test accuracy over wall-clock time", "", f"![test accuracy over wall-clock time]({_md_link(fig_path, out.parent)})", ""]
    except Exception as exc:
        logger.warning("comparison figure failed: %s: %s", type(exc).__name__, exc)
        lines += [f"Comparison figure not drawn: {_md_escape(f'{type(exc).__name__}: {exc}')}", ""]
    lines += ["## Runs", ""]
    for label, r in zip(_run_labels(rows), rows):
        if r.results_dir is None:
            lines.append(f"- {_md_escape(label)}: no results directory")
            continue
        figs = [n for n in ("accuracy_vs_round.png", "cell_normal.png", "cell_reduce.png") if (r.results_dir / n).exists()]
        links = ", ".join(f"[{n}]({_md_link(r.results_dir / n, out.parent)})" for n in figs)
        report = r.results_dir / REPORT_FILE
        head_link = f"[{_md_escape(label)}]({_md_link(report, out.parent)})" if report.exists() else _md_escape(label)
        lines.append(f"- {head_link}: `{r.results_dir}`" + (f" — {links}" if links else ""))
    lines.append("")
    _atomic_write(out, "\n".join(lines).encode())
    return out


# ---------------------------------------------------------------------------------------------
# TensorBoard (optional: `pip install tensorboard`)


class TensorBoardUnavailable(RuntimeError):
    pass


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


_TB_GROUPS = {
    "accuracy": "test", "loss": "test", "supernet-accuracy": "supernet", "supernet-loss": "supernet",
    "round-s": "time", "client-s-max": "time", "elapsed-s": "time",
}  # fmt: skip


class TensorBoardLogger:
    """Per-round scalars to TensorBoard with ``torch.utils.tensorboard.SummaryWriter``.

    Disabled (``enabled=False``) it imports and writes nothing. Enabled without the ``tensorboard``
    package it raises ``TensorBoardUnavailable`` at construction. Once running, a failing write logs
    a warning and disables the logger: TensorBoard never costs a run its results. The step is the
    round counted over all phases, so FedNAS retraining continues after its search.
    """

    def __init__(self, log_dir: str | Path, enabled: bool = True):
        self.log_dir = Path(log_dir)
        self.step = 0
        self._writer = None
        if not enabled:
            return
        message = "TensorBoard logging needs the tensorboard package: pip install tensorboard"
        if not tensorboard_available():
            raise TensorBoardUnavailable(message)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TensorBoardUnavailable(f"{message} ({exc})") from exc
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def _guard(self, fn: Callable[[], None]) -> None:
        if self._writer is None:
            return
        try:
            fn()
        except Exception as exc:
            logger.warning("TensorBoard logging disabled: %s: %s", type(exc).__name__, exc)
            self.close()

    def log_round(self, row: dict[str, Any], step: int | None = None) -> None:
        self.step = self.step + 1 if step is None else step

        def write() -> None:
            phase = str(row.get("phase", "run"))
            for key, value in row.items():
                if key in ("round", OP_PROBS_KEY, PRIMITIVES_KEY, EDGES_KEY) or isinstance(value, (str, list, dict)) or value is None:
                    continue
                v = _num(value)
                if math.isnan(v):
                    continue
                group = _TB_GROUPS.get(key) or ("arch" if ("entropy" in key or key in ("tau", "pruned-fraction", "skip-count")) else "round")
                self._writer.add_scalar(f"{group}/{key}", v, self.step)
            self._writer.add_scalar(f"phase/{phase}-round", _num(row.get("round")), self.step)
            self._writer.flush()

        self._guard(write)

    def log_summary(self, summary: dict[str, Any]) -> None:
        def write() -> None:
            for key in _COMPARISON_KEYS + ("final_test_loss", "wall_time_s", "personalized_accuracy_before"):
                v = _num(summary.get(key))
                if not math.isnan(v):
                    self._writer.add_scalar(f"final/{key}", v, self.step)
            if summary.get("genotype"):
                self._writer.add_text("genotype", "\n".join(_genotype_lines(summary["genotype"])), self.step)
            self._writer.flush()

        self._guard(write)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_tensorboard(results_dir: str | Path, log_dir: str | Path | None = None) -> Path:
    """Replay a finished run's rounds.jsonl and summary.json into TensorBoard event files."""
    data = load_run(results_dir)
    log_dir = Path(log_dir) if log_dir is not None else Path(results_dir) / "tensorboard"
    with TensorBoardLogger(log_dir) as tb:
        for row in data.rounds:
            tb.log_round(row)
        if data.summary:
            tb.log_summary(data.summary)
    return log_dir


# ---------------------------------------------------------------------------------------------
# Command line


def _is_comparison_json(path: Path) -> bool:
    return path.is_file() and path.suffix == ".json" or (path.is_dir() and (path / "comparison.json").exists() and not (path / "summary.json").exists())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmetanas_core.report",
        description="Markdown report (and figures) per run directory; with several runs or a comparison.json, also a comparison page.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="results directories, or a comparison.json from a comparison benchmark")
    parser.add_argument("--out", type=Path, default=None, help=f"comparison page (default ./{DEFAULT_COMPARISON_OUT})")
    parser.add_argument("--refresh", action="store_true", help="redraw every figure, not only the missing ones")
    parser.add_argument("--tensorboard", action="store_true", help="also replay each run into RUN_DIR/tensorboard (needs tensorboard)")
    args = parser.parse_args(argv)

    status = 0
    rows: list[ComparisonRow] = []
    meta: dict[str, Any] = {}
    dirs: list[Path] = []
    comparison = False
    for p in args.runs:
        if _is_comparison_json(p):
            comparison = True
            try:
                m, r = _comparison_from_json(p / "comparison.json" if p.is_dir() else p)
            except Exception as exc:
                print(f"error: {p}: not a readable comparison.json ({type(exc).__name__}: {exc})", file=sys.stderr)
                status = 1
                continue
            meta.update(m)
            rows += r
            dirs += [x.results_dir for x in r if x.results_dir is not None]
            for x in r:
                if x.results_dir is None:
                    print(f"warning: {x.method}: results_dir not found; table row only", file=sys.stderr)
        elif p.is_dir():
            dirs.append(p)
        else:
            print(f"error: {p} is neither a results directory nor a comparison.json", file=sys.stderr)
            status = 1
    for d in dirs:
        try:
            print(write_run_report(d, refresh=args.refresh))
        except Exception as exc:
            print(f"error: report for {d} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
        if args.tensorboard:
            try:
                print(write_tensorboard(d))
            except Exception as exc:
                print(f"error: TensorBoard for {d}: {exc}", file=sys.stderr)
                status = 1
    plain = [d for d in dirs if all(d != r.results_dir for r in rows)]
    rows += _comparison_from_dirs(plain) if plain else []
    if rows and (comparison or len(rows) > 1):
        out = args.out or Path(DEFAULT_COMPARISON_OUT)
        print(write_comparison_report(rows, out, meta))
    elif args.out is not None and not comparison:
        print(f"note: --out is for a comparison page; give two or more runs (only {len(rows)} given)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
