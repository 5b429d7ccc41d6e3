"""Size and CPU latency of a run's models: the supernet that was searched vs the model a device gets.

    python deploy/measure_model.py RUN_DIR [--runs 50] [--threads 1]

RUN_DIR is a results directory (config.yaml, derived_model.pt; export.json and
model_torchscript.pt are created there by the export if the run has none yet). Prints a Markdown
table: parameters, size on disk and median CPU latency for one image (batch 1) of

- the supernet (``SearchModel`` of the run's space, relaxed forward with
  ``RelaxSettings(tau=0.1, mode="softmax", noise=False)``; the run saves no supernet weights, so it
  is measured at initialisation, where every operation is active - its worst case and, within the
  threshold pruning, its usual cost);
- the derived network in PyTorch (eager, BatchNorm with batch statistics, as the run evaluates it);
- the exported, calibrated TorchScript model (what ``fedmetanas-predict`` runs), and model.onnx's
  size when present.

Latencies: median of --runs timed forward passes after 3 warm-up passes, torch intra-op threads as
given (default 1), CPU only. Image decoding and preprocessing are not included.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch

from fedmetanas_core.deployment.export import ONNX_FILE, export_model, measure_latency_ms
from fedmetanas_core.deployment.predict import EXPORT_JSON, TORCHSCRIPT_FILE, load_exported
from fedmetanas_core.run.outputs import MODEL_FILE, load_derived_model, machine_description


def _test_set(run_dir: Path):
    import yaml

    from fedmetanas_core.data import DataSpec, load_test_set
    from fedmetanas_core.run.config import RunConfig

    cfg = RunConfig.from_flat(yaml.safe_load((run_dir / "config.yaml").read_text()), check_paths=False)
    return cfg, load_test_set(DataSpec.from_config(cfg))


def _saved_bytes(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def _latency(forward, example: torch.Tensor, runs: int) -> str:
    try:
        lat = measure_latency_ms(forward, example, runs=runs)
    except Exception as exc:  # e.g. batch-statistics BatchNorm on 1x1 maps at batch 1
        return f"fails at batch 1 ({type(exc).__name__})"
    return f"{lat['median']:.3f} ms (p10 {lat['p10']:.3f}, p90 {lat['p90']:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--runs", type=int, default=50, help="timed forward passes per model (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir
    if not (run_dir / MODEL_FILE).is_file() or not (run_dir / "config.yaml").is_file():
        print(
            f"measure_model.py: {run_dir} has no {MODEL_FILE} and config.yaml (a run's results directory?)",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    cfg, test = _test_set(run_dir)
    derived = load_derived_model(run_dir).eval()
    if not (run_dir / TORCHSCRIPT_FILE).is_file() or not (run_dir / EXPORT_JSON).is_file():
        print(f"(no export in {run_dir} yet: exporting now)", file=sys.stderr)
        export_model(derived, test, run_dir)
        torch.set_num_threads(args.threads)
    info = json.loads((run_dir / EXPORT_JSON).read_text())
    traced, _ = load_exported(run_dir / TORCHSCRIPT_FILE)
    example = test.x[:1].clone()
    rows = []

    if getattr(derived, "genotype", None) is not None:
        from fedmetanas_core.space import RelaxSettings, SearchModel

        supernet = SearchModel(derived.space).eval()
        settings = RelaxSettings(tau=0.1, mode="softmax", noise=False)
        rows.append(
            (
                "supernet (SearchModel, relaxed softmax tau=0.1, eager)",
                sum(p.numel() for p in supernet.net.parameters()),  # as summary.json: weights, not the arch logits
                f"{_fmt_bytes(_saved_bytes(supernet))} (state_dict, not saved by runs)",
                _latency(lambda x: supernet(x, settings), example, args.runs),
            )
        )
    rows.append(
        (
            f"derived network ({type(derived).__name__}, eager, batch-statistics BN)",
            sum(p.numel() for p in derived.parameters()),
            f"{_fmt_bytes((run_dir / MODEL_FILE).stat().st_size)} ({MODEL_FILE})",
            _latency(derived, example, args.runs),
        )
    )
    rows.append(
        (
            "derived network, calibrated BN, TorchScript",
            info["parameters"],
            f"{_fmt_bytes((run_dir / TORCHSCRIPT_FILE).stat().st_size)} ({TORCHSCRIPT_FILE})",
            _latency(traced, example, args.runs),
        )
    )
    if (run_dir / ONNX_FILE).is_file():
        rows.append(
            (
                "same, ONNX",
                info["parameters"],
                f"{_fmt_bytes((run_dir / ONNX_FILE).stat().st_size)} ({ONNX_FILE})",
                "not measured (needs an ONNX runtime)",
            )
        )

    c, h, w = example.shape[1:]
    print(f"Run: {run_dir} (dataset {cfg.dataset}, input {c}x{h}x{w}, {cfg.num_server_rounds} rounds)")
    print(
        f"Machine: {machine_description()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"latency = median of {args.runs} single-image forward passes"
    )
    print()
    print("| model | parameters | size on disk | CPU latency per image |")
    print("|---|---:|---:|---:|")
    for name, params, size, latency in rows:
        print(f"| {name} | {params:,} | {size} | {latency} |")
    acc = info["accuracy"]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    print()
    print(
        f"Test accuracy: run (batch-statistics BN, summary.json) "
        f"{summary.get('final_test_accuracy', float('nan')):.4f}; "
        f"calibrated export {acc['test']:.4f} on all {acc['test_images']} test images, {acc['heldout']:.4f} on the "
        f"{acc['heldout_images']} not used for calibration; ONNX: {info['onnx']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
