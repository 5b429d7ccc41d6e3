"""What every figure shares: fixed pixel sizes, matplotlib's object API (no pyplot, no global
backend switch, so drawing from the ServerApp's thread is safe), atomic PNG writes, time axes."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from ..util.atomic import atomic_write_bytes
from .load import RunData

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

PHASE_COLORS = {"search": "tab:blue", "retrain": "tab:orange", "fedavg": "tab:green"}
METHOD_COLORS = {"fedmetanas": "tab:blue", "fednas": "tab:orange", "fedavg": "tab:green"}
_OTHER_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def line_color(method: str | None, k: int) -> str:
    """A comparison line's colour: the method's own (``METHOD_COLORS``), else the k-th of the others."""
    return METHOD_COLORS.get(method or "") or _OTHER_COLORS[k % len(_OTHER_COLORS)]


class FigureSkipped(Exception):
    """The figure does not apply to this run (e.g. a FedAvg run has no cell): no file, no error."""


def new_figure(name: str):
    from matplotlib.figure import Figure

    w, h = FIGURE_SIZES.get(name, COMPARISON_FIGURE_SIZE) if name != COMPARISON_FIGURE else COMPARISON_FIGURE_SIZE
    return Figure(figsize=(w / DPI, h / DPI), dpi=DPI)


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": the pixel size stays fixed
    atomic_write_bytes(path, buf.getvalue())


def run_title(data: RunData) -> str:
    return f"{data.method} on {data.dataset}"


def phase_spans(ax, pts: list[dict[str, Any]], key: str) -> None:
    """Shade and name the phases when a run has more than one (FedNAS: search, then retrain)."""
    phases = list(dict.fromkeys(p["phase"] for p in pts))
    if len(phases) < 2:
        return
    for k, phase in enumerate(phases):
        xs = [p[key] for p in pts if p["phase"] == phase and not math.isnan(p[key])]
        if xs and k % 2 == 1:
            ax.axvspan(min(xs), max(xs), color="0.93", zorder=0)


def time_axis(pts: list[dict[str, Any]]) -> tuple[float, str]:
    top = max((p["time"] for p in pts if not math.isnan(p["time"])), default=0.0)
    return (60.0, "elapsed wall-clock time (min)") if top > 600 else (1.0, "elapsed wall-clock time (s)")
