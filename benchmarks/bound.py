"""A run's compute bound: its counted FLOPs over the FLOP rate this CPU sustains on the same ops.

    python -m benchmarks.bound                                   # the default run (digits), 6 rounds
    python -m benchmarks.bound -c conf/cifar10-cpu.toml --rounds 8 \\
        --timing benchmarks/results/cifar10-cpu-tuned/seed-0/fedmetanas/rounds.jsonl

1. **Count.** The preset runs in this process through ``LocalGrid`` (the real ServerApp loop and
   ClientApp) for ``--rounds`` rounds. Every client's local training runs under a dispatch mode that
   records each convolution and matrix product (forward and backward) with its shapes, and
   ``torch.utils.flop_counter`` counts its FLOPs. BatchNorm, pooling and element-wise ops are not
   counted, so the bound is a lower bound.
2. **Rate.** Each distinct recorded call is replayed alone on one thread: at its own shapes (the
   rate the run could reach if nothing but these kernels ran, per-call overhead included) and with
   the batch 16x larger (the rate the kernels sustain once the call overhead is amortised).
3. **Bound.** A round's bound is the sum over its calls of FLOPs / rate, over the cores the clients
   run on (one client per core, as the Ray simulation runs them). ``--timing`` names a rounds.jsonl
   of a real ``flwr run`` of the same settings; its ``round-s`` against the bound is the multiple.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
COUNTED = {"convolution", "convolution_backward", "mm", "addmm", "bmm"}
SCALE = 16  # the batch multiple of the sustained-rate replay


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return ("T", tuple(x.shape), x.dtype, channels_last, x.stride() == (0,) * x.dim() if x.dim() else False)
    if isinstance(x, (list, tuple)):
        return tuple(_spec(v) for v in x)
    return x


class Recorder(TorchDispatchMode):
    """Counts every counted op by its signature (op, argument shapes and values)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in COUNTED:
            self.calls[(func, _spec(args))] += 1
        return func(*args, **(kwargs or {}))


def make_arg(spec: Any, batch_scale: int = 1, batch_dim_of: set[int] | None = None, index: int = 0) -> Any:
    """A fresh argument like the recorded one (``_spec``); its dim 0 times ``batch_scale`` when ``index``
    is in ``batch_dim_of``."""
    if isinstance(spec, tuple) and spec and spec[0] == "T":
        _, shape, dtype, channels_last, expanded = spec
        shape = list(shape)
        if batch_dim_of is not None and index in batch_dim_of and shape:
            shape[0] *= batch_scale
        if expanded:  # an expanded scalar: a shape-only weight, or the gradient of a sum
            return torch.empty((), dtype=dtype).expand(shape)
        t = torch.randn(shape, dtype=dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t
    if isinstance(spec, tuple):
        return tuple(make_arg(s, batch_scale) for s in spec) if spec and not isinstance(spec[0], str) else spec
    return spec


def batched_args(func, spec: tuple, scale: int) -> tuple:
    """The call's arguments with the batch dimension of its activations multiplied by ``scale``."""
    name = func.overloadpacket.__name__
    if name == "convolution":  # (input, weight, bias, ...)
        batch = {0}
    elif name == "convolution_backward":  # (grad_output, input, weight, ...)
        batch = {0, 1}
    else:  # mm / addmm / bmm: scale the rows of the first matrix operand (the batch of a classifier)
        batch = {1} if name == "addmm" else {0}
    out = [make_arg(s, scale, batch, i) for i, s in enumerate(spec)]
    if name == "addmm":  # bias broadcasts over rows; scaled rows need a broadcastable bias
        out[0] = out[0] if out[0].dim() == 1 else torch.randn(out[1].shape[0], out[2].shape[1])
    return tuple(out)


def flops_of(func, args: tuple) -> int:
    with FlopCounterMode(display=False) as counter:
        func(*args)
    return counter.get_total_flops()


def time_call(func, args: tuple, min_seconds: float = 0.05) -> float:
    """Median seconds per call of ``func(*args)`` over blocks that last at least ``min_seconds``."""
    func(*args)
    reps = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            func(*args)
        if time.perf_counter() - t0 >= min_seconds or reps >= 4096:
            break
        reps *= 2
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            func(*args)
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def record_run(items: list[str], rounds: int, clients: int) -> list[dict]:
    """Per round: the counted calls of all clients' local training."""
    import fedmetanas_core.federation.client_round as client
    from benchmarks import inprocess

    per_round: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    original = client.local_trainer

    def recording_trainer(phase: str, method: str):
        trainer = original(phase, method)

        def run(model, data, cfg, plan, *args, **kwargs):
            with Recorder() as rec:
                result = trainer(model, data, cfg, plan, *args, **kwargs)
            per_round[plan.server_round].update(rec.calls)
            return result

        return run

    client.local_trainer = recording_trainer
    try:
        with tempfile.TemporaryDirectory() as out:
            inprocess.run(
                [*items, f"num-server-rounds={rounds}", "torch-threads=1", "checkpoint=false"], clients, Path(out)
            )
    finally:
        client.local_trainer = original
    return [{"round": r, "calls": per_round[r]} for r in sorted(per_round)]


def rates(signatures: set) -> dict:
    """(flops, seconds at the run's shapes, flops and seconds at SCALE x the batch) per signature."""
    out = {}
    for func, spec in signatures:
        args = tuple(make_arg(s) for s in spec)
        big = batched_args(func, spec, SCALE)
        out[(func, spec)] = (flops_of(func, args), time_call(func, args), flops_of(func, big), time_call(func, big))
    return out


def phase_of(previous: dict) -> str:
    """A round runs under the masks the previous round left (its rounds.jsonl row)."""
    if previous.get("cell-decided"):
        return "discrete cell"
    return "pruning" if previous.get("pruned-fraction", 0) > 0 else "full supernet"


def save_calls(rows: list[dict], path: Path) -> None:
    def enc(x):
        if isinstance(x, torch.dtype):
            return {"dtype": str(x).removeprefix("torch.")}
        if isinstance(x, tuple):
            return {"t": [enc(v) for v in x]}
        return x

    data = [
        {"round": r["round"], "calls": [[str(f), enc(spec), n] for (f, spec), n in r["calls"].items()]} for r in rows
    ]
    path.write_text(json.dumps(data))


def load_calls(path: Path) -> list[dict]:
    def dec(x):
        if isinstance(x, dict) and "dtype" in x:
            return getattr(torch, x["dtype"])
        if isinstance(x, dict) and "t" in x:
            return tuple(dec(v) for v in x["t"])
        return x

    def op(name: str):
        ns, packet, overload = name.split(".")
        return getattr(getattr(getattr(torch.ops, ns), packet), overload)

    rows = []
    for r in json.loads(path.read_text()):
        rows.append(
            {"round": r["round"], "calls": collections.Counter({(op(f), dec(spec)): n for f, spec, n in r["calls"]})}
        )
    return rows


def bound_table(rows: list[dict], measured: dict[int, dict], cores: int) -> tuple[list[str], list[dict]]:
    signatures = set().union(*(set(r["calls"]) for r in rows))
    table = rates(signatures)
    lines = [
        "| round | phase | GFLOP (counted, all clients) | bound at the run's shapes (s) | bound, sustained rate (s) "
        "| measured round (s) | client work (s, per core) | round / sustained bound |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    out = []
    for r in rows:
        flops = sum(table[k][0] * n for k, n in r["calls"].items())
        at_shapes = sum(table[k][1] * n for k, n in r["calls"].items()) / cores
        sustained = sum(table[k][0] / (table[k][2] / table[k][3]) * n for k, n in r["calls"].items()) / cores
        m = measured.get(r["round"], {})
        round_s, client_s = m.get("round-s"), (m.get("client-s-sum") or 0) / cores if m else None
        phase = phase_of(measured.get(r["round"] - 1, {}))
        row = {
            "round": r["round"],
            "phase": phase,
            "gflop": flops / 1e9,
            "bound_run_shapes_s": at_shapes,
            "bound_sustained_s": sustained,
            "round_s": round_s,
            "client_s_per_core": client_s,
        }
        out.append(row)
        ratio = f"{round_s / sustained:.1f}x" if round_s else "-"
        lines.append(
            f"| {r['round']} | {phase} | {flops / 1e9:.1f} | {at_shapes:.2f} | {sustained:.2f} | "
            f"{round_s if round_s is None else f'{round_s:.2f}'} | "
            f"{client_s if client_s is None else f'{client_s:.2f}'} | {ratio} |"
        )
    rate_run = sum(v[0] for v in table.values()) / sum(v[1] for v in table.values())
    rate_big = sum(v[2] for v in table.values()) / sum(v[3] for v in table.values())
    lines += [
        "",
        f"Distinct counted calls: {len(table)}. One core sustains {rate_big / 1e9:.1f} GFLOP/s on them at "
        f"{SCALE}x the batch and {rate_run / 1e9:.1f} GFLOP/s at the run's shapes (FLOP-weighted, each distinct call "
        f"once); the bound divides by {cores} cores (one simulated client per core).",
    ]
    return lines, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--run-config", action="append", default=[], help="preset file or 'key=value ...'")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--timing",
        type=Path,
        default=ROOT / "benchmarks/results/default-run/seed-0/rounds.jsonl",
        help="rounds.jsonl of a real flwr run of the same settings",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the table and rows here (.md and .json)")
    ap.add_argument(
        "--calls",
        type=Path,
        default=None,
        help="the recorded calls: read from here when the file exists (only the rates are measured), else written",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.calls and args.calls.is_file():
        rows = load_calls(args.calls)
    else:
        rows = record_run(args.run_config, args.rounds, args.clients)
        if args.calls:
            save_calls(rows, args.calls)
    measured = {}
    if args.timing and args.timing.is_file():
        measured = {r["round"]: r for r in map(json.loads, args.timing.read_text().splitlines())}
    lines, out = bound_table(rows, measured, args.cores)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
