"""Optional TensorBoard logging of a run's rounds (``pip install tensorboard``), live or replayed."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .format import genotype_lines, number
from .load import COMPARISON_KEYS, EDGES_KEY, OP_PROBS_KEY, PRIMITIVES_KEY, load_run

logger = logging.getLogger(__name__)


class TensorBoardUnavailable(RuntimeError):
    pass


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


_TB_GROUPS = {
    "accuracy": "test",
    "loss": "test",
    "supernet-accuracy": "supernet",
    "supernet-loss": "supernet",
    "round-s": "time",
    "client-s-max": "time",
    "elapsed-s": "time",
}


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
                if (
                    key in ("round", OP_PROBS_KEY, PRIMITIVES_KEY, EDGES_KEY)
                    or isinstance(value, (str, list, dict))
                    or value is None
                ):
                    continue
                v = number(value)
                if math.isnan(v):
                    continue
                group = _TB_GROUPS.get(key) or (
                    "arch" if ("entropy" in key or key in ("tau", "pruned-fraction", "skip-count")) else "round"
                )
                self._writer.add_scalar(f"{group}/{key}", v, self.step)
            self._writer.add_scalar(f"phase/{phase}-round", number(row.get("round")), self.step)
            self._writer.flush()

        self._guard(write)

    def log_summary(self, summary: dict[str, Any]) -> None:
        def write() -> None:
            for key in COMPARISON_KEYS + ("final_test_loss", "wall_time_s", "personalized_accuracy_before"):
                v = number(summary.get(key))
                if not math.isnan(v):
                    self._writer.add_scalar(f"final/{key}", v, self.step)
            if summary.get("genotype"):
                self._writer.add_text("genotype", "\n".join(genotype_lines(summary["genotype"])), self.step)
            self._writer.flush()

        self._guard(write)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass

    def __enter__(self) -> TensorBoardLogger:
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
