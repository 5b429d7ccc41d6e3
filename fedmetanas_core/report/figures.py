"""A run's figures, drawn next to its summary.json; one that fails never stops the others.

``write_run_figures(results_dir)`` draws the PNGs; a figure that fails (bad data, a missing key) is
left out and its error goes to ``figures_errors.txt``. A figure that does not apply to the run (no
search phase, so no temperature, heatmap or cell) is skipped without an error.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..util.atomic import atomic_write_text
from .canvas import FIGURES, FigureSkipped
from .cells import draw_alpha_heatmap, draw_cell
from .curves import draw_accuracy_vs_round, draw_accuracy_vs_time, draw_personalization, draw_temperature
from .load import RunData, load_run

logger = logging.getLogger(__name__)

ERRORS_FILE = "figures_errors.txt"


RENDERERS: dict[str, Callable[[RunData, Path], None]] = {
    "accuracy_vs_round.png": draw_accuracy_vs_round,
    "accuracy_vs_time.png": draw_accuracy_vs_time,
    "temperature.png": draw_temperature,
    "alpha_heatmap_normal.png": lambda d, p: draw_alpha_heatmap(d, p, "normal"),
    "alpha_heatmap_reduce.png": lambda d, p: draw_alpha_heatmap(d, p, "reduce"),
    "cell_normal.png": lambda d, p: draw_cell(d, p, "normal"),
    "cell_reduce.png": lambda d, p: draw_cell(d, p, "reduce"),
    "personalization.png": draw_personalization,
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
            atomic_write_text(path, "\n".join(lines) + "\n")
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
