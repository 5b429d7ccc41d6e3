"""``python -m fedmetanas_core.report``: report pages for run directories and comparisons."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .comparison import (
    DEFAULT_COMPARISON_OUT,
    ComparisonRow,
    comparison_from_dirs,
    comparison_from_json,
    write_comparison_report,
)
from .pages import write_run_report
from .tensorboard_log import write_tensorboard


def _is_comparison_json(path: Path) -> bool:
    return (
        path.is_file()
        and path.suffix == ".json"
        or (path.is_dir() and (path / "comparison.json").exists() and not (path / "summary.json").exists())
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmetanas_core.report",
        description="Markdown report (and figures) per run directory; with several runs or a comparison.json, also "
        "a comparison page.",
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, help="results directories, or a comparison.json from a comparison benchmark"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"comparison page (default ./{DEFAULT_COMPARISON_OUT})")
    parser.add_argument("--refresh", action="store_true", help="redraw every figure, not only the missing ones")
    parser.add_argument(
        "--tensorboard", action="store_true", help="also replay each run into RUN_DIR/tensorboard (needs tensorboard)"
    )
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
                m, r = comparison_from_json(p / "comparison.json" if p.is_dir() else p)
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
    rows += comparison_from_dirs(plain) if plain else []
    if rows and (comparison or len(rows) > 1):
        out = args.out or Path(DEFAULT_COMPARISON_OUT)
        print(write_comparison_report(rows, out, meta))
    elif args.out is not None and not comparison:
        print(f"note: --out is for a comparison page; give two or more runs (only {len(rows)} given)", file=sys.stderr)
    return status
