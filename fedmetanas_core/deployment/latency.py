"""Measured latency: per-op tables for a search space, and whole exported networks.

A device owner runs ``fedmetanas profile -c <preset> --out table.json`` *on the device*: every op of
the space is timed at its own shapes (batch 1, one thread, median of many runs after warm-up) in
the runtime the device will use (ONNX Runtime when installed, else TorchScript), and so is the part
of the network that every cell choice shares. A run then takes ``latency-table = "table.json"``:
its latency budget and cost term read the table (``space.cost.CostModel``).

How the table predicts a network: ``fixed_ms`` + ``op_scale`` x the sum of the chosen ops'
entries. Each op is timed as a one-op model, less the runtime's per-call overhead (``overhead_ms``:
the intercept of one-element models of 1 and 9 nodes). A sum of ops misses what only whole networks
have (additions, concatenations, the stem and preprocessing, memory traffic between ops; runtimes
fuse across ops: nn-Meter's caveat), so ``fixed_ms`` and ``op_scale`` are fitted by least squares
on whole networks timed during profiling: the all-skip network and ``calibration_cells`` random
cells from seeds that no check draws. ``benchmarks/latency_check.py`` measures how well the table
predicts other random networks.

The table also holds FedAvg's small CNN at ``CNN_PROFILE_WIDTHS`` (``cnn_ms``, whole networks timed
in the same session, no fit: there is nothing to sum), so the CNN baseline is sized to a latency
budget by the same device's measurements as the cells. ``add_cnn_entries`` adds them to a table
profiled without them, timed beside its calibration networks and rescaled to the table's speed.

Networks are timed as they are deployed: BatchNorm calibrated to running statistics
(``export.calibrate_batchnorm``), then exported.
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..space import SpaceConfig, make_op
from ..space.cost import CostModel, OpShape, build_cost_model, edge_shapes
from ..util.atomic import atomic_write_text

TABLE_FORMAT = 1
# per model: 150 interleaved blocks of 10 (8x8 ops take microseconds; 600 gave Spearman 0.87-0.91 on digits,
# 1500 0.93-0.95)
PROFILE_RUNS = 1500
CALIBRATION_SEED = 900_000  # random cells that calibrate a table; checks draw theirs elsewhere
RUNTIMES = ("onnxruntime", "torch")
CNN_PROFILE_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # the small CNN's first-conv widths a table times


def default_runtime() -> str:
    try:
        import onnx  # noqa: F401  (torch's ONNX exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime"


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__} (TorchScript)"


def space_signature(space: SpaceConfig, image_hw: tuple[int, int]) -> dict[str, Any]:
    """What a table was measured for: a table is valid for exactly this space at this image size."""
    sig = asdict(space)
    sig["primitives"] = list(space.primitives)
    if space.reduction_cells() == replace(space, reduction_positions=None).reduction_cells():
        del sig["reduction_positions"]  # DARTS's layout: tables measured before the key existed stay valid
    else:
        sig["reduction_positions"] = list(space.reduction_positions)
    if space.norm == "batch":
        del sig["norm"]  # likewise for DARTS's BatchNorm
    del sig["search_norm"]  # the supernet's while it searches: a table is the derived network's
    del sig["input_pruning"]  # likewise: a search-only choice, one table for FedMetaNAS and a fixed cell
    sig["image_hw"] = list(image_hw)
    return sig


# ---------------------------------------------------------------------------------------------
# timing one model


def _calibrated(module: nn.Module, example: torch.Tensor) -> nn.Module:
    from .export import calibrate_batchnorm

    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(8, *example.shape[1:], generator=gen)
    return calibrate_batchnorm(module, batch)


def _onnx_session(module: nn.Module, example: torch.Tensor):
    import warnings

    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": example.numpy()}
    return lambda: session.run(None, feed)


def _torch_call(module: nn.Module, example: torch.Tensor):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))

    def call():
        with torch.no_grad():
            traced(example)

    return call


def time_calls_ms(calls: list[Callable[[], Any]], runs: int, block: int = 10, seed: int = 0) -> list[float]:
    """Median wall time in ms of each of ``calls``, measured *interleaved*: ``runs / block`` rounds,
    each timing every call ``block`` times in a shuffled order (after one untimed call). A machine
    whose speed drifts (shared cores, frequency scaling) then slows every model alike instead of
    whichever ran at the time."""
    rng = random.Random(seed)
    for call in calls:  # warm-up (ONNX Runtime and TorchScript optimise during their first calls)
        for _ in range(10):
            call()
    samples: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    for _ in range(max(1, runs // block)):
        rng.shuffle(order)
        for k in order:
            call = calls[k]
            call()  # untimed: the model's weights and buffers back in cache, as on a device running it alone
            t0 = time.perf_counter()
            for _ in range(block):
                call()
            samples[k].append((time.perf_counter() - t0) * 1000.0 / block)
    return [statistics.median(s) for s in samples]


def deployed_call(module: nn.Module, example: torch.Tensor, runtime: str) -> Callable[[], Any]:
    """One forward of ``module`` on ``example`` as deployed: calibrated BatchNorm, exported to
    ``runtime``, one thread."""
    model = _calibrated(module, example)
    return _onnx_session(model, example) if runtime == "onnxruntime" else _torch_call(model, example)


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def models_latency_ms(
    modules: list[nn.Module], examples: list[torch.Tensor], runtime: str, runs: int = 200
) -> list[float]:
    """Median latency of each module on its example (batch 1, deployed), timed interleaved."""
    with one_thread():
        calls = [deployed_call(m, x, runtime) for m, x in zip(modules, examples, strict=False)]
        return time_calls_ms(calls, runs)


def model_latency_ms(module: nn.Module, example: torch.Tensor, runtime: str, runs: int = 200) -> float:
    return models_latency_ms([module], [example], runtime, runs)[0]


class _Scales(nn.Module):
    """``steps`` chained one-element multiplications: with 1 and 9 of them, what a call costs before
    any node runs (the intercept), whatever the model does."""

    def __init__(self, steps: int):
        super().__init__()
        self.factors = nn.Parameter(torch.linspace(1.0, 1.1, steps), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.factors:
            x = x * f
        return x


def overhead_models() -> tuple[list[nn.Module], list[torch.Tensor]]:
    """One-element models of 1 and 9 nodes: their intercept is what a call costs before any node."""
    one = torch.zeros(1, 1, 1, 1)
    return [_Scales(1), _Scales(9)], [one, one]


def intercept(short: float, long: float) -> float:
    return max(0.0, short - (long - short) / 8)


# ---------------------------------------------------------------------------------------------
# the table


def profile_space(
    space: SpaceConfig,
    image_hw: tuple[int, int],
    runtime: str | None = None,
    runs: int = PROFILE_RUNS,
    calibration_cells: int = 8,
    progress: Callable[[str], None] | None = None,
    held_out: list | None = None,
) -> dict[str, Any]:
    """Time every op of ``space`` at its shapes and the shared part; the table as plain values.

    ``held_out`` genotypes are timed in the same interleaved session but not fitted on: their
    measured latencies come back under ``held_out_ms`` (a check of the table on one machine whose
    speed drifts between sessions)."""
    from ..method.genotype import DiscreteNetwork

    runtime = runtime or default_runtime()
    torch.manual_seed(0)
    shapes = sorted(
        {s for _, rows in edge_shapes(space, image_hw) for row in rows for s in row if s.op != "none"},
        key=lambda s: s.key(),
    )
    # the sum of op entries misses what only whole networks have (adds, concatenations, memory
    # traffic between ops): fit whole = fixed + scale * sum(ops) on calibration networks, the
    # all-skip skeleton and random cells drawn from seeds that no check uses
    calibration = calibration_genotypes(space, calibration_cells)
    modules, examples = overhead_models()
    modules += [make_op(s.op, s.channels, s.stride, space.norm) for s in shapes]
    examples += [torch.randn(1, s.channels, s.height, s.width) for s in shapes]
    modules += [DiscreteNetwork(space, g) for g in calibration]
    examples += [torch.randn(1, space.in_channels, *image_hw)] * len(calibration)
    held_out = list(held_out or [])
    modules += [DiscreteNetwork(space, g) for g in held_out]
    examples += [torch.randn(1, space.in_channels, *image_hw)] * len(held_out)
    cnns = cnn_family(space)
    modules += cnns
    examples += [torch.randn(1, space.in_channels, *image_hw)] * len(cnns)
    if progress:
        wholes_timed = len(calibration) + len(held_out) + len(cnns)
        progress(f"timing {len(shapes)} ops and {wholes_timed} whole networks, interleaved")
    times = models_latency_ms(modules, examples, runtime, runs)
    overhead = intercept(times[0], times[1])
    ops = {s.key(): max(0.0, t - overhead) for s, t in zip(shapes, times[2 : 2 + len(shapes)], strict=False)}
    first = 2 + len(shapes)
    wholes = times[first : first + len(calibration)]
    first += len(calibration)
    held_out_ms, cnn_times = times[first : first + len(held_out)], times[first + len(held_out) :]
    raw = {
        "format": TABLE_FORMAT,
        "fixed_ms": 0.0,
        "op_scale": 1.0,
        "ops": ops,
        "space": space_signature(space, image_hw),
    }
    in_ops = LatencyTable(raw).cost_model(space, image_hw)
    sums = [in_ops.genotype_cost(g) for g in calibration]
    scale, fixed = _line(sums, wholes)
    if progress:
        progress(f"whole networks: {fixed:.4f} ms + {scale:.3f} x sum of ops ({len(calibration)} calibration networks)")
    return {
        "format": TABLE_FORMAT,
        "runtime": runtime_version(runtime),
        "threads": 1,
        "batch": 1,
        "runs": runs,
        "statistic": "median",
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "space": space_signature(space, image_hw),
        "overhead_ms": overhead,
        "fixed_ms": fixed,
        "op_scale": scale,
        "calibration": {
            "networks": len(calibration),
            "seed": CALIBRATION_SEED,
            "sum_ops_ms": sums,
            "measured_ms": wholes,
        },
        "ops": ops,
        "cnn_ms": {str(w): t for w, t in zip(CNN_PROFILE_WIDTHS, cnn_times, strict=True)},
        **({"held_out_ms": held_out_ms} if held_out else {}),
    }


def cnn_family(space: SpaceConfig) -> list[nn.Module]:
    """FedAvg's small CNN at every width a table times."""
    from ..method.genotype import SimpleCNN

    return [SimpleCNN(space, w) for w in CNN_PROFILE_WIDTHS]


def add_cnn_entries(
    table: LatencyTable, space: SpaceConfig, image_hw: tuple[int, int], runs: int = PROFILE_RUNS
) -> dict[str, float]:
    """Time the small CNN family beside ``table``'s calibration networks and add it at the table's
    speed (a table profiled before the CNN had entries keeps its op entries, and the runs made with
    it stay valid). Returns the machine's speed now against the table's."""
    times, ratio = timed_beside_table(cnn_family(space), table, space, image_hw, table.runtime, runs)
    table.data["cnn_ms"] = {str(w): t / ratio for w, t in zip(CNN_PROFILE_WIDTHS, times, strict=True)}
    table.data["cnn_added"] = {
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "machine_speed_vs_table": ratio,
        "runs": runs,
    }
    return {"machine_speed_vs_table": ratio}


def _line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept of y on x (slope 1 through the mean when x does not vary or
    the fit is not increasing: more op time never predicts less)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    var = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=False)) / var if var > 0 else 1.0
    if slope <= 0:
        slope = 1.0
    return slope, max(0.0, my - slope * mx)


class LatencyTable:
    """A measured table (``profile_space``'s values) for one space at one image size."""

    def __init__(self, data: dict[str, Any], source: str = "latency-table"):
        if data.get("format") != TABLE_FORMAT or "ops" not in data or "space" not in data:
            raise ValueError(f"{source}: not a fedmetanas latency table (format {TABLE_FORMAT})")
        self.data, self.source = data, source

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read latency table {path}: {exc}") from None
        return cls(data, str(path))

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.data, indent=1, sort_keys=True))

    @property
    def runtime(self) -> str:
        """The runtime the table was measured in (``RUNTIMES``): networks compared with it run there too."""
        return "onnxruntime" if str(self.data.get("runtime", "")).startswith("onnxruntime") else "torch"

    def mismatch(self, space: SpaceConfig, image_hw: tuple[int, int]) -> str | None:
        """Why this table cannot serve ``space`` at ``image_hw`` (None when it can)."""
        want = space_signature(space, image_hw)
        have = self.data["space"]
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            return (
                f"measured for another space ({', '.join(f'{k} {have.get(k)} != {want[k]}' for k in diff[:3])}); "
                "run `fedmetanas profile` for this one"
            )
        return None

    def op_ms(self, shape: OpShape) -> float:
        try:
            return float(self.data.get("op_scale", 1.0)) * float(self.data["ops"][shape.key()])
        except KeyError:
            raise ValueError(f"{self.source}: no entry for {shape.key()}") from None

    def cost_model(self, space: SpaceConfig, image_hw: tuple[int, int]) -> CostModel:
        return build_cost_model(space, image_hw, "latency-ms", self.op_ms, float(self.data["fixed_ms"]))

    def cnn_ms(self) -> dict[int, float]:
        """The small CNN measured whole, by first-conv width (empty: the table did not time it)."""
        return {int(w): float(ms) for w, ms in self.data.get("cnn_ms", {}).items()}


def calibration_genotypes(space: SpaceConfig, cells: int) -> list:
    """The networks a table is fitted on: the all-skip network and ``cells`` random cells."""
    from ..method.genotype import Genotype, random_genotype

    nodes = tuple((("skip_connect", 0), ("skip_connect", 1)) for _ in space.topology.nodes)
    return [Genotype(normal=nodes, reduce=nodes)] + [
        random_genotype(space.primitives, space.num_nodes, CALIBRATION_SEED + k) for k in range(cells)
    ]


def latency_against_table(
    net: nn.Module,
    table: LatencyTable,
    space: SpaceConfig,
    image_hw: tuple[int, int],
    runtime: str,
    runs: int = PROFILE_RUNS,
) -> dict[str, float]:
    """``net``'s latency now, and at the speed the machine had when ``table`` was measured
    (``timed_beside_table``)."""
    (now,), ratio = timed_beside_table([net], table, space, image_hw, runtime, runs)
    return {"latency_ms": now, "machine_speed_vs_table": ratio, "latency_ms_at_table_speed": now / ratio}


def timed_beside_table(
    modules: list[nn.Module],
    table: LatencyTable,
    space: SpaceConfig,
    image_hw: tuple[int, int],
    runtime: str,
    runs: int,
) -> tuple[list[float], float]:
    """``modules``' latencies now, timed in one interleaved session with ``table``'s calibration
    networks, and the median ratio of those networks' times now / then: the machine's speed change
    since the table (1 on a device that runs nothing else; up to 2x on a shared machine minutes apart)."""
    from ..method.genotype import DiscreteNetwork

    then = table.data["calibration"]["measured_ms"]
    calibration = [DiscreteNetwork(space, g) for g in calibration_genotypes(space, len(then) - 1)]
    example = torch.randn(1, space.in_channels, *image_hw)
    times = models_latency_ms([*modules, *calibration], [example] * (len(modules) + len(calibration)), runtime, runs)
    ratio = statistics.median(now / old for now, old in zip(times[len(modules) :], then, strict=True))
    return times[: len(modules)], ratio
