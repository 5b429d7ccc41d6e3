"""Figures and Markdown reports rebuilt from a run's files (never a rerun), and optional TensorBoard logging.

    python -m fedmetanas_core.report RUN_DIR [RUN_DIR ...] [--out comparison_report.md] [--refresh]
    python -m fedmetanas_core.report path/to/comparison.json [--out ...]

- ``load``: reading a run (``load_run``, ``load_rounds``, ``time_to_reach``; what ``rounds.jsonl`` holds);
- ``format``: how numbers, links and genotypes are printed;
- ``canvas``, ``curves``, ``cells``: the figures (sizes and shared helpers; curves; architecture);
- ``figures``: ``write_run_figures``, every figure of a run, failures in ``figures_errors.txt``;
- ``pages``: ``write_run_report``, a run's ``report.md``;
- ``comparison``: ``write_comparison_report``, one page comparing runs;
- ``seeds``: runs repeated over seeds: ``over_seeds`` (mean and std of each figure) and
  ``draw_accuracy_over_seeds`` (accuracy over time, mean with a ± std band);
- ``tensorboard_log``: ``TensorBoardLogger``, per-round scalars to TensorBoard;
- ``cli``: the command line above.

Everything is torch-free (matplotlib is imported when a figure is drawn). The names below are
re-exported lazily: importing one part (the ServerApp needs the figures and the TensorBoard logger)
does not import the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load": (
        "COMPARISON_KEYS",
        "EDGES_KEY",
        "OP_PROBS_KEY",
        "PRIMITIVES_KEY",
        "RunData",
        "load_rounds",
        "load_run",
        "time_to_reach",
    ),
    "format": ("format_accuracy", "format_count", "format_mean_std", "format_number", "format_seconds"),
    "canvas": ("COMPARISON_FIGURE", "COMPARISON_FIGURE_SIZE", "DPI", "FIGURES", "FIGURE_SIZES", "FigureSkipped"),
    "figures": ("ERRORS_FILE", "RENDERERS", "FigureResult", "render_run_figures", "write_run_figures"),
    "pages": ("REPORT_FILE", "summary_rows", "write_run_report"),
    "comparison": ("DEFAULT_COMPARISON_OUT", "ComparisonRow", "write_comparison_report"),
    "seeds": ("draw_accuracy_over_seeds", "mean_std", "over_seeds"),
    "tensorboard_log": ("TensorBoardLogger", "TensorBoardUnavailable", "tensorboard_available", "write_tensorboard"),
    "cli": ("main",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
