"""A Markdown page comparing runs (from their directories or a comparison benchmark's
comparison.json: one run per row, or a method's means over seeds), with test accuracy over
wall-clock time in one figure."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..util.atomic import atomic_write_text
from .canvas import COMPARISON_FIGURE, line_color, new_figure, save_figure, time_axis
from .format import format_accuracy, format_count, format_seconds, md_escape, md_link, number
from .load import COMPARISON_KEYS, RunData, load_run, series, time_to_reach
from .pages import REPORT_FILE

logger = logging.getLogger(__name__)

DEFAULT_COMPARISON_OUT = "comparison_report.md"


@dataclass
class ComparisonRow:
    method: str
    values: dict[str, Any]
    results_dir: Path | None
    data: RunData | None


def comparison_from_json(path: Path) -> tuple[dict[str, Any], list[ComparisonRow]]:
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
        # a comparison over seeds (benchmarks.compare) has each figure's mean over the seeds
        values = {k: r[k] if k in r else r[f"{k}_mean"] for k in COMPARISON_KEYS if k in r or f"{k}_mean" in r}
        for k in COMPARISON_KEYS:  # fill what the row lacks from the run's summary
            if k not in values and data is not None and data.summary and k in data.summary:
                values[k] = data.summary[k]
        rows.append(ComparisonRow(str(r.get("method") or (data.method if data else "?")), values, d, data))
    return {k: v for k, v in doc.items() if k != "rows"}, rows


def comparison_from_dirs(dirs: list[Path]) -> list[ComparisonRow]:
    rows = []
    for d in dirs:
        data = load_run(d)
        s = data.summary or {}
        rows.append(ComparisonRow(data.method, {k: s[k] for k in COMPARISON_KEYS if k in s}, d, data))
    fednas = next((r for r in rows if r.method == "fednas"), None)
    target = number(fednas.values.get("final_test_accuracy")) if fednas else math.nan
    if not math.isnan(target):
        for r in rows:
            r.values["time_to_reach_fednas_accuracy_s"] = time_to_reach(r.data.rounds if r.data else [], target)
    return rows


def _run_labels(rows: list[ComparisonRow]) -> list[str]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.method] = counts.get(r.method, 0) + 1
    return [
        r.method if counts[r.method] == 1 or r.results_dir is None else f"{r.method} ({r.results_dir.name})"
        for r in rows
    ]


def _comparison_figure(rows: list[ComparisonRow], path: Path, title: str) -> None:
    plotted = [(lbl, r) for lbl, r in zip(_run_labels(rows), rows, strict=False) if r.data and r.data.rounds]
    if not plotted:
        raise ValueError("no run has readable rounds")
    all_pts = [p for _, r in plotted for p in series(r.data.rounds)]
    scale, xlabel = time_axis(all_pts)
    fig = new_figure(COMPARISON_FIGURE)
    ax = fig.subplots()
    for k, (label, r) in enumerate(plotted):
        color = line_color(r.method if sum(x.method == r.method for _, x in plotted) == 1 else None, k)
        pts = series(r.data.rounds)
        ax.plot(
            [p["time"] / scale for p in pts],
            [number(p.get("accuracy")) for p in pts],
            "o-",
            ms=3,
            color=color,
            label=f"{label}: test accuracy (final {format_accuracy(r.values.get('final_test_accuracy'))})",
        )
        phases = list(dict.fromkeys(p["phase"] for p in pts))
        for phase in phases[1:]:  # mark where a later phase starts (FedNAS retraining)
            first = next(p for p in pts if p["phase"] == phase)
            ax.axvline(first["time"] / scale, color=color, ls=":", lw=1)
            ax.annotate(
                f"{label}: {phase} starts",
                (first["time"] / scale, 0.98),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color=color,
                rotation=90,
                va="top",
                ha="right",
            )
    ax.set_xlabel(xlabel)
    ax.set_xlim(left=0)
    ax.set_ylabel("test accuracy (derived / final network)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.09, top=0.94)
    save_figure(fig, path)


def write_comparison_report(rows: list[ComparisonRow], out: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """One Markdown page comparing runs, with ``comparison_accuracy_vs_time.png`` next to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    title = "Comparison: " + " vs ".join(dict.fromkeys(r.method for r in rows))
    lines = [f"# {title}", ""]
    for key in ("preset", "machine"):
        if meta.get(key) is not None:
            lines.append(f"- **{key}**: {md_escape(meta[key])}")
    datasets = sorted({r.data.dataset for r in rows if r.data})
    if datasets:
        lines.append(f"- **dataset**: {', '.join(datasets)}")
    lines.append("")
    show_ttr = any("time_to_reach_fednas_accuracy_s" in r.values for r in rows)
    head = [
        "Run",
        "Method",
        "Final acc.",
        "Supernet acc.",
        "Personalized acc.",
        "Search time",
        "Retrain time",
        "Total time",
    ]
    head += ["Time to FedNAS acc."] if show_ttr else []
    head += ["Params"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in zip(_run_labels(rows), rows, strict=False):
        v = r.values
        run = md_escape(r.results_dir.name if r.results_dir else label)
        if r.results_dir is not None and (r.results_dir / REPORT_FILE).exists():
            run = f"[{run}]({md_link(r.results_dir / REPORT_FILE, out.parent)})"
        cells = [
            run,
            md_escape(r.method),
            format_accuracy(v.get("final_test_accuracy")),
            format_accuracy(v.get("supernet_test_accuracy")),
            format_accuracy(v.get("personalized_accuracy")),
            format_seconds(v.get("search_time_s")),
            format_seconds(v.get("retrain_time_s")),
            format_seconds(v.get("total_time_s")),
        ]
        if show_ttr:
            ttr = v.get("time_to_reach_fednas_accuracy_s")
            cells.append("not reached" if ttr is None else format_seconds(ttr))
        cells.append(format_count(v.get("params")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if show_ttr:
        lines += [
            "*Time to FedNAS acc.*: first elapsed wall-clock time at which the run's test accuracy reached "
            "FedNAS's final test accuracy.",
            "",
        ]
    fig_path = out.parent / COMPARISON_FIGURE
    try:
        _comparison_figure(rows, fig_path, f"{title}: test accuracy over wall-clock time")
        lines += [
            "## Test accuracy over wall-clock time",
            "",
            f"![test accuracy over wall-clock time]({md_link(fig_path, out.parent)})",
            "",
        ]
    except Exception as exc:
        logger.warning("comparison figure failed: %s: %s", type(exc).__name__, exc)
        lines += [f"Comparison figure not drawn: {md_escape(f'{type(exc).__name__}: {exc}')}", ""]
    lines += ["## Runs", ""]
    for label, r in zip(_run_labels(rows), rows, strict=False):
        if r.results_dir is None:
            lines.append(f"- {md_escape(label)}: no results directory")
            continue
        figs = [
            n for n in ("accuracy_vs_round.png", "cell_normal.png", "cell_reduce.png") if (r.results_dir / n).exists()
        ]
        links = ", ".join(f"[{n}]({md_link(r.results_dir / n, out.parent)})" for n in figs)
        report = r.results_dir / REPORT_FILE
        head_link = f"[{md_escape(label)}]({md_link(report, out.parent)})" if report.exists() else md_escape(label)
        lines.append(f"- {head_link}: `{r.results_dir}`" + (f" — {links}" if links else ""))
    lines.append("")
    atomic_write_text(out, "\n".join(lines))
    return out
