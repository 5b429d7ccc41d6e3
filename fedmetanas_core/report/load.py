"""Reading a run's files (summary.json, config.yaml, rounds.jsonl, genotype.yaml), never a rerun.

``rounds.jsonl`` holds one object per round: ``phase``, ``round``, ``accuracy``, ``loss``,
``supernet-accuracy``, ``supernet-loss``, ``tau``, ``elapsed-s``, ``alpha-entropy-normal``,
``alpha-entropy-reduce`` and, for the heatmaps, per search round: ``op-probs`` (``{"normal":
[[p per op] per edge], "reduce": ...}``), ``primitives`` (op names) and ``edges`` (``"2<-0"``, ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .format import number

# rounds.jsonl keys that carry the per-edge op probabilities (search rounds only).
OP_PROBS_KEY, PRIMITIVES_KEY, EDGES_KEY = "op-probs", "primitives", "edges"

# summary.json numbers that comparison pages and TensorBoard show
COMPARISON_KEYS = (
    "final_test_accuracy",
    "supernet_test_accuracy",
    "personalized_accuracy",
    "search_time_s",
    "retrain_time_s",
    "total_time_s",
    "time_to_reach_fednas_accuracy_s",
    "params",
)


@dataclass
class RunData:
    dir: Path
    summary: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    genotype: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)  # what could not be read, for the errors file

    @property
    def finished(self) -> bool:
        """The server writes summary.json after the model and genotype, so with the config it marks a
        run that ended; a run still going (or killed) has no summary yet."""
        return self.summary is not None and self.config is not None

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


def series(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``step`` (round counted over all phases) and a non-decreasing ``time`` (elapsed-s)."""
    out, offset, last = [], 0.0, None
    for i, row in enumerate(rows, start=1):
        t = number(row.get("elapsed-s"))
        if not math.isnan(t):
            if last is not None and t + offset < last:  # the clock restarted (resumed run): keep counting
                offset = last
            t += offset
            last = t
        out.append({**row, "step": i, "time": t})
    return out


def time_to_reach(rows: list[dict[str, Any]], target: float) -> float | None:
    """The first elapsed wall-clock second (``series`` time) at which the run's test accuracy reached
    ``target``; None when it never did."""
    return next((p["time"] for p in series(rows) if number(p.get("accuracy")) >= target - 1e-12), None)


def images_to_reach(rows: list[dict[str, Any]], target: float | None = None) -> float | None:
    """Images a client put through forward and backward, on average, up to the first round whose
    test accuracy reached ``target`` (every round when ``target`` is None): a budget that, unlike
    seconds, does not depend on what else the machine was doing. None when it never reached it or
    the rounds do not carry ``client-images-mean``."""
    total = 0.0
    for row in rows:
        images = number(row.get("client-images-mean"))
        if math.isnan(images):
            return None
        total += images
        if target is not None and number(row.get("accuracy")) >= target - 1e-12:
            return total
    return total if target is None and rows else None
