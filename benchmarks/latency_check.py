"""How well a latency table predicts whole networks it was not calibrated on.

    python -m benchmarks.latency_check -c conf/digits.toml [--cells 24] [--table table.json] [--out DIR]

Profiles the preset's space on this machine (or reads ``--table``), draws ``--cells`` random cells
from seeds no table calibrates on, exports each whole network (calibrated BatchNorm, batch 1, one
thread, the table's runtime) and compares the table's prediction with its measured median latency:
Spearman rank correlation and median relative error. When it profiles, the check networks are timed
in the same interleaved session as the table's ops (not fitted on): on a shared machine whose speed
drifts by up to 2x between sessions a few seconds apart, that is what keeps the comparison fair.
Writes ``latency_check.json`` (every cell's prediction and measurement) and prints one line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

from fedmetanas_core.deployment.latency import PROFILE_RUNS, LatencyTable, models_latency_ms, profile_space
from fedmetanas_core.method.budget import run_space
from fedmetanas_core.method.genotype import DiscreteNetwork, random_genotype
from harness.cli import resolve_run_config

CHECK_SEED = 500_000


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def check(table: LatencyTable, space, image_hw, genotypes: list, measured: list[float]) -> dict:
    """The table's predictions for ``genotypes`` against their ``measured`` latencies."""
    cost = table.cost_model(space, image_hw)
    rows = [
        {"seed": CHECK_SEED + k, "genotype": g.to_dict(), "predicted_ms": cost.genotype_cost(g), "measured_ms": m}
        for k, (g, m) in enumerate(zip(genotypes, measured, strict=False))
    ]
    pred = [r["predicted_ms"] for r in rows]
    meas = [r["measured_ms"] for r in rows]
    errors = [abs(p - m) / m for p, m in zip(pred, meas, strict=False)]
    return {
        "cells": len(rows),
        "spearman": spearman(pred, meas),
        "median_relative_error": statistics.median(errors),
        "max_relative_error": max(errors),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", "-c", action="append", default=[])
    parser.add_argument("--table", default="", help="a table from `fedmetanas profile` (default: profile now)")
    parser.add_argument("--cells", type=int, default=24)
    parser.add_argument("--runs", type=int, default=PROFILE_RUNS)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    _, cfg = resolve_run_config(args.run_config)
    space, image_hw = run_space(cfg)
    genotypes = [random_genotype(space.primitives, space.num_nodes, CHECK_SEED + k) for k in range(args.cells)]
    if args.table:  # a device's table: the check networks are timed now, on this machine
        table = LatencyTable.load(args.table)
        problem = table.mismatch(space, image_hw)
        if problem:
            raise SystemExit(f"latency_check: {problem}")
        example = torch.randn(1, space.in_channels, *image_hw)
        measured = models_latency_ms(
            [DiscreteNetwork(space, g) for g in genotypes], [example] * args.cells, table.runtime, args.runs
        )
    else:  # profiled now, the check networks timed in the same interleaved session (not fitted on)
        data = profile_space(space, image_hw, runs=args.runs, held_out=genotypes)
        measured = data.pop("held_out_ms")
        table = LatencyTable(data)
    result = check(table, space, image_hw, genotypes, measured)
    result.update(
        {
            "runtime": table.data["runtime"],
            "machine": f"{platform.machine()} {platform.processor()}",
            "space": table.data["space"],
            "table": table.data,
        }
    )
    print(
        f"{cfg.dataset} {image_hw[0]}x{image_hw[1]}, {args.cells} random cells, {table.data['runtime']}: "
        f"Spearman {result['spearman']:.3f}, median error {100 * result['median_relative_error']:.1f} %, "
        f"max {100 * result['max_relative_error']:.1f} %"
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latency_check.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
