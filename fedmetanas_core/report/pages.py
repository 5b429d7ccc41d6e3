"""A run's Markdown page, ``report.md`` in its results directory, with its figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from ..util.atomic import atomic_write_text
from .canvas import FIGURES
from .figures import ERRORS_FILE, FigureResult, render_run_figures
from .format import format_accuracy, format_count, format_number, format_seconds, genotype_lines, md_escape, number
from .load import load_run, series

REPORT_FILE = "report.md"


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


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    s = summary
    pers = format_accuracy(s.get("personalized_accuracy"))
    if not math.isnan(number(s.get("personalized_accuracy_std"))):
        pers += f" ± {number(s['personalized_accuracy_std']):.4f}"
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
    ]
    out += [f"- **{k}**: {md_escape(v)}" for k, v in meta]
    out += ["", "## Results", ""]
    if data.summary is None:
        out += ["`summary.json` is missing or unreadable: no final numbers.", ""]
    else:
        out += ["| Metric | Value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary_rows(s)] + [""]
    out += ["## Genotype", ""] + genotype_lines(data.genotype)
    out += ["## Figures", ""]
    errors = _read_errors(d)
    for name in FIGURES:
        if (d / name).exists():
            out += [f"### {_FIGURE_TITLES[name]}", "", f"![{_FIGURE_TITLES[name]}]({name})", ""]
    not_drawn = [(n, result.skipped.get(n) or errors.get(n) or "not drawn") for n in FIGURES if not (d / n).exists()]
    if not_drawn:
        out += ["Not drawn:", ""] + [f"- `{n}`: {md_escape(why)}" for n, why in not_drawn] + [""]
    if errors:
        out += [f"Problems found while drawing (from `{ERRORS_FILE}`):", ""]
        out += [f"- `{k}`: {md_escape(v)}" for k, v in errors.items()] + [""]
    if data.rounds:
        out += [
            "## Rounds",
            "",
            "| Phase | Round | tau | Test acc. | Supernet acc. | Test loss | Elapsed |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in series(data.rounds):
            tau = number(p.get("tau"))
            out.append(
                f"| {p['phase']} | {p['round']} | {'–' if math.isnan(tau) else f'{tau:.3f}'} | "
                f"{format_accuracy(p.get('accuracy'))} "
                f"| {format_accuracy(p.get('supernet-accuracy'))} | {format_number(p.get('loss'))} | "
                f"{format_seconds(p['time'])} |"
            )
        out.append("")
    if data.config:
        out += [
            "## Configuration",
            "",
            "<details><summary>config.yaml</summary>",
            "",
            "```yaml",
            yaml.safe_dump(data.config, sort_keys=True).rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    if s.get("versions"):
        out += ["## Software", "", ", ".join(f"{k} {v}" for k, v in s["versions"].items()), ""]
    path = d / REPORT_FILE
    atomic_write_text(path, "\n".join(out))
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
