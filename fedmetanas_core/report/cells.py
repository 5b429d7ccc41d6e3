"""Figures of the searched architecture: op probabilities per edge over the search (heatmaps) and
the derived cell drawn as a graph."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..names import edge_key
from .canvas import FigureSkipped, new_figure, run_title, save_figure
from .format import node_name, number
from .load import EDGES_KEY, OP_PROBS_KEY, PRIMITIVES_KEY, RunData


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


def draw_alpha_heatmap(data: RunData, path: Path, cell_type: str) -> None:
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
    fig = new_figure(path.name)
    axes = fig.subplots(1, len(mats), sharey=True, squeeze=False)[0]
    annotate = n_edges * n_ops <= 120
    im = None
    for ax, i, m in zip(axes, picks, mats, strict=False):
        r = rows[i]
        im = ax.imshow(m, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_xticks(range(n_ops), primitives, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n_edges), edges, fontsize=8)
        tau = number(r.get("tau"))
        ax.set_title(f"round {r['round']}" + ("" if math.isnan(tau) else f" (tau {tau:.2f})"), fontsize=10)
        if annotate and i == picks[-1]:  # values on the last round only (colours tell the rest)
            for e in range(n_edges):
                for o in range(n_ops):
                    v = m[e, o]
                    ax.text(
                        o,
                        e,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if v < 0.6 * vmax else "black",
                    )
        if i == picks[-1]:
            from matplotlib.patches import Rectangle

            for e, o in chosen:
                ax.add_patch(Rectangle((o - 0.5, e - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    axes[0].set_ylabel("edge (node <- input)")
    fig.subplots_adjust(left=0.07, right=0.89, bottom=0.25, top=0.88, wspace=0.08)
    fig.colorbar(im, cax=fig.add_axes((0.91, 0.25, 0.015, 0.63)), label="op probability (softmax of alpha)")
    note = "; red boxes: ops of the derived genotype" if chosen else ""
    fig.suptitle(f"{run_title(data)}: {cell_type} cell op probabilities per edge{note}", fontsize=11)
    save_figure(fig, path)


def _chosen_cells(
    genotype: dict | None, cell_type: str, edges: list[str], primitives: list[str]
) -> list[tuple[int, int]]:
    out = []
    try:
        for k, node in enumerate((genotype or {}).get(cell_type) or []):
            for choice in node:
                label = edge_key(k + 2, int(choice["input"]))
                if label in edges and choice["op"] in primitives:
                    out.append((edges.index(label), primitives.index(choice["op"])))
    except (TypeError, KeyError, ValueError):
        return []
    return out


def _arc_point(p1: tuple[float, float], p2: tuple[float, float], rad: float, t: float) -> tuple[float, float]:
    """Point at ``t`` on matplotlib's ``arc3,rad=rad`` curve from p1 to p2 (equal aspect: data = display)."""
    (x1, y1), (x2, y2) = p1, p2
    cx, cy = (x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1)
    u = 1 - t
    return u * u * x1 + 2 * u * t * cx + t * t * x2, u * u * y1 + 2 * u * t * cy + t * t * y2


def draw_cell(data: RunData, path: Path, cell_type: str) -> None:
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
    fig = new_figure(path.name)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.88))
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_xlim(-0.9, pos[out_id][0] + 0.9)
    ax.set_ylim(-2.6, 2.6)
    ops = sorted({str(c["op"]) for node in nodes for c in node})
    palette = [
        "tab:blue",
        "tab:orange",
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:olive",
        "tab:cyan",
        "tab:gray",
    ]
    colors = {op: palette[i % len(palette)] for i, op in enumerate(ops)}
    box = dict(boxstyle="round,pad=0.4", lw=1.2)
    for i, (x, y) in pos.items():
        if i < 2:
            style = dict(box, fc="#cfe8ff", ec="tab:blue")
        elif i == out_id:
            style = dict(box, fc="#ffe3c4", ec="tab:orange")
        else:
            style = dict(box, fc="#f2f2f2", ec="0.3")
        label = r"$c_{k}$" if i == out_id else node_name(i)
        ax.text(x, y, label, ha="center", va="center", fontsize=13, bbox=style, zorder=3)

    def arrow(src: int, dst: int, rad: float, color, **style) -> None:
        ax.annotate(
            "",
            xy=pos[dst],
            xytext=pos[src],
            zorder=style.pop("zorder", 2),
            arrowprops=dict(
                arrowstyle="-|>", color=color, shrinkA=16, shrinkB=16, connectionstyle=f"arc3,rad={rad}", **style
            ),
        )

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
            ax.text(
                mx,
                my,
                op,
                ha="center",
                va="center",
                fontsize=8,
                color=colors[op],
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85),
                zorder=4,
            )
    for k in range(n):
        span = pos[out_id][0] - pos[k + 2][0]
        rad = 0.0 if k == n - 1 else 2 * (0.3 + 0.12 * (n - 2 - k)) / span  # below the line
        arrow(k + 2, out_id, rad, "0.6", lw=1, ls="--", zorder=1)
    fig.suptitle(
        f"{run_title(data)}: derived {cell_type} cell ({n} nodes; dashed: concatenation into the output)", fontsize=11
    )
    save_figure(fig, path)
