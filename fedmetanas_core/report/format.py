"""How the report pages print numbers, links and genotypes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..names import CELL_TYPES


def number(value: Any) -> float:
    """A finite float, or NaN (for None, strings, inf)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def format_number(value: Any, digits: int = 4) -> str:
    v = number(value)
    return "–" if math.isnan(v) else f"{v:.{digits}f}"


def format_mean_std(mean: Any, std: Any, digits: int = 4) -> str:
    """``mean ± std`` (a figure over seeds), or "–" when there is no mean."""
    return "–" if math.isnan(number(mean)) else f"{format_number(mean, digits)} ± {format_number(std, digits)}"


def format_accuracy(value: Any) -> str:
    """How the pages print an accuracy (a fraction, 4 decimals), or "–" when there is none."""
    return format_number(value, 4)


def format_seconds(value: Any) -> str:
    v = number(value)
    if math.isnan(v):
        return "–"
    if v < 60:
        return f"{v:.1f} s"
    m, s = divmod(round(v), 60)
    h, m = divmod(m, 60)
    return f"{v:.0f} s ({h}h {m:02d}m {s:02d}s)" if h else f"{v:.0f} s ({m}m {s:02d}s)"


def format_count(value: Any) -> str:
    v = number(value)
    return "–" if math.isnan(v) else f"{int(v):,}"


def md_link(target: Path | str, start: Path) -> str:
    rel = Path(os.path.relpath(Path(target).resolve(), start.resolve())).as_posix()
    return f"<{rel}>" if " " in rel else rel


def md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def node_name(i: int, mathtext: bool = True) -> str:
    if i == 0:
        return r"$c_{k-2}$" if mathtext else "c_{k-2}"
    if i == 1:
        return r"$c_{k-1}$" if mathtext else "c_{k-1}"
    return str(i - 2)


def genotype_lines(genotype: dict | None) -> list[str]:
    if genotype is None:
        return ["No searched architecture: this run trains a fixed network."]
    lines = []
    for cell_type in CELL_TYPES:
        lines += [f"**{cell_type} cell**", "", "| Node | Inputs (op ← input) |", "|---|---|"]
        for k, node in enumerate(genotype.get(cell_type) or []):
            try:
                parts = [f"`{c['op']}` ← {node_name(int(c['input']), mathtext=False)}" for c in node]
            except (TypeError, KeyError, ValueError):
                parts = [md_escape(node)]
            lines.append(f"| {k} | {', '.join(parts)} |")
        lines.append("")
    return lines
