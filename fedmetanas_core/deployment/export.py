"""Device export of a run's final network, and ``fedmetanas-predict`` to run it on image files.

The searched networks use BatchNorm with *batch* statistics (``track_running_stats=False``): a
prediction depends on the other images in the batch, and a single image whose feature maps are 1x1
cannot be normalised at all. A device classifies one image at a time, so the export first
*calibrates* the network: every batch-statistics BatchNorm becomes an ordinary eval-mode BatchNorm
whose running mean/variance are the statistics its input had on one calibration batch. On that
batch the calibrated network reproduces the batch-statistics network exactly; on any other input
it is a fixed function, independent of batch composition.

Calibration data: the server holds only the global test split, so the calibration batch is a fixed
subset of it (``CALIBRATION_SIZE`` images, at most half of the split, chosen by a seeded
permutation; labels are never used). Accuracy is reported on the *other* test images
(``accuracy_heldout``), and on the whole split for comparison with ``summary.json``.

Files written to the results directory:

- ``model_torchscript.pt``: the calibrated network traced and frozen with TorchScript; input float32
  [N, C, H, W] normalised with the dataset's mean/std, output logits [N, classes]. Its
  ``export.json`` extra file holds what a device needs to preprocess images.
- ``model.onnx``: the same network in ONNX (only when the ``onnx`` package is importable).
- ``export.json``: files, sizes on disk, parameters, preprocessing, calibration, accuracy and
  CPU latency per image.

``fedmetanas-predict MODEL_FILE IMAGE_FOLDER`` (module ``predict``) needs only torch and Pillow (no Flower).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..util.atomic import atomic_write_bytes, atomic_write_text

# the device side (fedmetanas-predict) reads what this module writes; predict_main stays importable
# from here for console scripts installed before it moved to ``predict``
from .predict import EXPORT_JSON, TORCHSCRIPT_FILE, load_exported, predict_main  # noqa: F401

ONNX_FILE = "model.onnx"
CALIBRATION_SIZE = 512
CALIBRATION_SEED = 0
LATENCY_RUNS = 50
CHECK_IMAGES = 1024  # held-out images on which the saved file is compared with the eager network
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# BatchNorm calibration
# --------------------------------------------------------------------------------------------


def batch_stat_norms(net: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BatchNorm layers that normalise with the statistics of the current batch."""
    return [
        (name, m)
        for name, m in net.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (not m.track_running_stats or m.running_mean is None)
    ]


def reference_path():
    """Context in which the search-space ops call their nn modules (BatchNorm included).

    ``space`` has a fast path for training that calls ``F.batch_norm`` with batch statistics
    directly, bypassing the BatchNorm modules; calibration and tracing must see the modules.
    """
    try:
        from ..space import fast_path
    except ImportError:  # a search space without a fast path
        return contextlib.nullcontext()
    return fast_path(False)


class Calibrated(nn.Module):
    """The calibrated network; runs it on the reference path so its fixed BatchNorms are used."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with reference_path():
            return self.net(x)


def calibrate_batchnorm(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``net`` (CPU, eval mode) whose batch-statistics BatchNorms are replaced by
    eval-mode BatchNorms with running statistics = mean and (biased) variance of their input on the
    calibration batch ``x``, computed in one forward pass over the whole batch.

    The result is wrapped in ``Calibrated`` (forward on the search space's reference path, whose
    ops call the BatchNorm modules). It gives exactly the original network's outputs on ``x`` (up to float
    rounding), and on any other input a result that does not depend on the batch. BatchNorms that
    already track running statistics are left as they are.
    """
    model = copy.deepcopy(net).cpu().eval()
    norms = batch_stat_norms(model)
    if not norms:
        return Calibrated(model).eval()
    if len(x) < 2:
        raise ValueError("calibration needs a batch of at least 2 images")
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def record(_module, inputs):
            (inp,) = inputs
            dims = [d for d in range(inp.ndim) if d != 1]
            var, mean = torch.var_mean(inp.detach().double(), dim=dims, correction=0)
            stats[name] = (mean.float(), var.float())

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in norms]
    try:
        with torch.no_grad(), reference_path():
            model(x.cpu())
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, _ in norms if name not in stats]
    if missing:  # left as they are, they would keep the exported model batch-dependent
        raise RuntimeError(
            f"{len(missing)} BatchNorm module(s) did not run during calibration (e.g. {missing[0]!r}): "
            f"the network normalises without calling them (see reference_path)"
        )
    modules = dict(model.named_modules())
    for name, old in norms:
        mean, var = stats[name]
        new = type(old)(
            old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine, track_running_stats=True
        )
        if old.affine:
            new.weight.data.copy_(old.weight.data)
            new.bias.data.copy_(old.bias.data)
        new.running_mean.copy_(mean)
        new.running_var.copy_(var)  # biased: what batch-statistics BatchNorm divides by
        new.num_batches_tracked.fill_(1)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    return Calibrated(model).eval()


def calibration_split(
    n: int, size: int = CALIBRATION_SIZE, seed: int = CALIBRATION_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration indices, held-out indices) of a split of n images: min(size, n // 2) images
    chosen by a seeded permutation; both sorted."""
    k = max(2, min(size, n // 2))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:k].sort().values, perm[k:].sort().values


# --------------------------------------------------------------------------------------------
# Normalisation statistics
# --------------------------------------------------------------------------------------------


def _as_floats(values: Any) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    return [float(v) for v in values]


def find_normalization(test: Any, results_dir: Path | None = None) -> tuple[list[float], list[float], str] | None:
    """(mean, std, source) of the per-channel normalisation applied to ``test.x``, or None.

    ``ImageData`` carries the train split's statistics that ``data`` normalised every split with.
    """
    mean, std = getattr(test, "mean", None), getattr(test, "std", None)
    if mean is not None and std is not None:
        return _as_floats(mean), _as_floats(std), "ImageData.mean/std"
    return None


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _accuracy(forward, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, torch.Tensor]:
    preds = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            preds.append(forward(x[start : start + batch_size]).argmax(1))
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return (float((pred == y).float().mean()) if len(y) else float("nan")), pred


def measure_latency_ms(forward, example: torch.Tensor, runs: int = LATENCY_RUNS, warmup: int = 3) -> dict[str, float]:
    """Median, 10th and 90th percentile wall time of ``forward(example)`` in ms (after warm-up:
    TorchScript's profiling executor optimises the graph during its first calls)."""
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            forward(example)
        for _ in range(runs):
            t0 = time.perf_counter()
            forward(example)
            times.append((time.perf_counter() - t0) * 1000.0)
    t = torch.tensor(times)
    return {
        "median": float(t.median()),
        "p10": float(t.quantile(0.1)),
        "p90": float(t.quantile(0.9)),
        "runs": runs,
    }


def _trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # torch >= 2.9 marks TorchScript deprecated; it is still the torch-only deployable format
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        try:
            # parameters become constants and BatchNorm is folded into the convolution before it:
            # a 5x smaller file (no per-module code) and a slightly faster forward
            return torch.jit.freeze(traced.eval())
        except Exception:  # freezing is an optimisation only
            return traced


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """'ok', or why no ONNX file was written."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it; not a dependency of this project)
    except ImportError:
        return "skipped: the 'onnx' package is not installed (pip install onnx to get model.onnx)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
            )
        import onnx
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        # numerical check with onnx's own (pure Python) reference runtime: no onnxruntime needed
        check = example.repeat(2, 1, 1, 1) if len(example) == 1 else example
        (got,) = ReferenceEvaluator(proto).run(None, {"image": check.numpy()})
        with torch.no_grad():
            gap = float((torch.from_numpy(got) - model(check)).abs().max())
        if gap > 1e-3:
            raise ValueError(f"ONNX output differs from the model by {gap:.2e}")
        return "ok"
    except Exception as exc:
        path.unlink(missing_ok=True)
        return f"failed: {type(exc).__name__}: {exc}"


def export_model(
    net: nn.Module,
    test: Any,
    results_dir: str | Path,
    *,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    calibration_size: int = CALIBRATION_SIZE,
    latency_runs: int = LATENCY_RUNS,
    onnx: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Calibrate ``net``'s BatchNorms, export it (TorchScript, ONNX if available) into
    ``results_dir`` and write ``export.json``; returns its content.

    ``test`` is an ImageData (x normalised [N, C, H, W], y, classes). ``normalization`` =
    (mean, std) per channel of that normalisation; when None it is taken from ``test`` or recomputed
    from ``results_dir/config.yaml`` (see ``find_normalization``). Without it the model is still
    exported, but ``fedmetanas-predict`` cannot preprocess image files for it. ``extra`` joins
    export.json as it is (the run's cost report: budget, MACs, measured latency).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: extra threads only contend (10x slower on a busy 2-core box)
    try:
        return _export(net, test, Path(results_dir), normalization, calibration_size, latency_runs, onnx, extra or {})
    finally:
        torch.set_num_threads(threads)


def _export(net, test, results_dir: Path, normalization, calibration_size, latency_runs, onnx, extra) -> dict[str, Any]:
    t_start = time.perf_counter()
    results_dir.mkdir(parents=True, exist_ok=True)
    x, y = test.x.detach().cpu().float(), test.y.detach().cpu().long()
    n, channels, height, width = x.shape

    if normalization is not None:
        norm = (_as_floats(normalization[0]), _as_floats(normalization[1]), "export_model(normalization=...)")
    else:
        norm = find_normalization(test, results_dir)
    if norm is not None and not (len(norm[0]) == len(norm[1]) == channels):
        raise ValueError(f"normalization has {len(norm[0])}/{len(norm[1])} values for {channels} channel(s)")

    calib_idx, held_idx = calibration_split(n, calibration_size)
    reference = copy.deepcopy(net).cpu().eval()
    calibrated_layers = len(batch_stat_norms(reference))  # 0 when the network normalises per image
    model = calibrate_batchnorm(reference, x[calib_idx])
    with torch.no_grad():
        calib_gap = float((model(x[calib_idx]) - reference(x[calib_idx])).abs().max())

    example = x[:1].clone()
    traced = _trace(model, example)
    meta = {
        "format_version": FORMAT_VERSION,
        "input": {
            "layout": "NCHW float32, one image per row",
            "in_channels": channels,
            "image_size": [height, width],
            "color_mode": "L" if channels == 1 else "RGB",
            "pixel_scale": "pixels / 255 (values in [0, 1])",
            "resize": "bilinear to image_size when the file has another size",
            "mean": norm[0] if norm else None,
            "std": norm[1] if norm else None,
            "normalization_source": norm[2] if norm else None,
        },
        "output": "logits [N, num_classes]; predicted class = argmax",
        "classes": list(test.classes),
    }
    ts_path = results_dir / TORCHSCRIPT_FILE
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, buf, _extra_files={EXPORT_JSON: json.dumps(meta)})
    atomic_write_bytes(ts_path, buf.getvalue())

    loaded, _ = load_exported(ts_path)
    acc_full, pred_ts = _accuracy(loaded, x, y)
    acc_held = float((pred_ts[held_idx] == y[held_idx]).float().mean()) if len(held_idx) else float("nan")
    check = held_idx[:CHECK_IMAGES] if len(held_idx) else calib_idx[:CHECK_IMAGES]
    _, pred_eager = _accuracy(model, x[check], y[check])  # the file computes what the network does
    latency = measure_latency_ms(loaded, example, runs=latency_runs)

    files = {TORCHSCRIPT_FILE: ts_path.stat().st_size}
    onnx_status = "disabled" if not onnx else _export_onnx(model, example, results_dir / ONNX_FILE)
    if onnx_status == "ok":
        files[ONNX_FILE] = (results_dir / ONNX_FILE).stat().st_size
    from ..run.outputs import MODEL_FILE, machine_description

    derived = results_dir / MODEL_FILE

    info = {
        **meta,
        "files": files,
        "derived_model": {"file": MODEL_FILE, "bytes": derived.stat().st_size} if derived.is_file() else None,
        "onnx": onnx_status,
        "parameters": sum(p.numel() for p in model.parameters()),
        "buffers": sum(b.numel() for b in model.buffers()),
        "calibration": {
            "data": "fixed subset of the server's test split (labels unused)",
            "images": len(calib_idx),
            "seed": CALIBRATION_SEED,
            "batchnorm_layers": calibrated_layers,
            "max_abs_logit_diff_on_calibration_batch": calib_gap,
        },
        "accuracy": {
            "heldout": acc_held,
            "heldout_images": len(held_idx),
            "test": acc_full,
            "test_images": n,
            "note": "summary.json's final_test_accuracy is the same network with batch statistics"
            if calibrated_layers
            else "summary.json's final_test_accuracy is the same network (per-image norms: nothing calibrated)",
            "torchscript_matches_eager": float((pred_ts[check] == pred_eager).float().mean()),
            "torchscript_matches_eager_images": len(check),
        },
        "latency_ms_per_image": {
            "model": TORCHSCRIPT_FILE,
            **latency,
            "batch_size": 1,
            "torch_threads": torch.get_num_threads(),  # 1, set by export_model
            "device": "cpu",
            "note": "model forward only; image decoding and preprocessing excluded",
        },
        "machine": machine_description(),
        "torch": torch.__version__,
        "export_seconds": None,
        **extra,
    }
    info["export_seconds"] = round(time.perf_counter() - t_start, 3)
    atomic_write_text(results_dir / EXPORT_JSON, json.dumps(info, indent=2))
    return info
