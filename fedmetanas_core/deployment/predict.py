"""``fedmetanas-predict``: classify image files with a model written by ``export.export_model``.

Needs only torch and Pillow (no Flower, no search space): the TorchScript file carries the network
and, as its ``export.json`` extra file, what a device needs to preprocess images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

EXPORT_JSON = "export.json"
TORCHSCRIPT_FILE = "model_torchscript.pt"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class PredictError(Exception):
    """A user error: bad path, missing metadata; printed without a traceback."""


def load_exported(model_file: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The TorchScript model and the metadata stored inside it. ``model_file`` may be a results
    directory (its model_torchscript.pt is used)."""
    path = Path(model_file)
    if path.is_dir():
        path = path / TORCHSCRIPT_FILE
    if not path.is_file():
        raise PredictError(
            f"model file {str(path)!r} does not exist (expected a {TORCHSCRIPT_FILE} written by the export)"
        )
    extra = {EXPORT_JSON: ""}
    try:
        with warnings.catch_warnings():  # torch >= 2.9: "torch.jit.load is deprecated"
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
    except Exception as exc:
        raise PredictError(f"{str(path)!r} is not a TorchScript model file: {exc}") from None
    meta = json.loads(extra[EXPORT_JSON]) if extra[EXPORT_JSON] else {}
    return model, meta


def list_images(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise PredictError(f"image folder {str(root)!r} does not exist or is not a directory")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def preprocess(path: Path, meta_input: dict[str, Any]) -> torch.Tensor:
    """[1, C, H, W] float32, as in training: decode, grey or RGB, bilinear resize, /255, normalise."""
    from PIL import Image

    if meta_input.get("mean") is None or meta_input.get("std") is None:
        raise PredictError(
            "the model file stores no normalisation (mean/std); re-export it with "
            "export_model(..., normalization=(mean, std))"
        )
    height, width = meta_input["image_size"]
    channels = int(meta_input["in_channels"])
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    x = data.view(height, width, channels).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(meta_input["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(meta_input["std"], dtype=torch.float32).view(-1, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def _classes_from(run_dir: str | Path) -> list[str]:
    path = Path(run_dir)
    path = path / EXPORT_JSON if path.is_dir() else path
    if not path.is_file():
        raise PredictError(f"--classes-from: {str(path)!r} does not exist (a run directory holding {EXPORT_JSON})")
    classes = json.loads(path.read_text()).get("classes")
    if not classes:
        raise PredictError(f"--classes-from: {str(path)!r} names no classes")
    return [str(c) for c in classes]


def predict_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedmetanas-predict",
        description="Classify every .png/.jpg/.jpeg under IMAGE_FOLDER (recursively) with an exported "
        "FedMetaNAS model. Prints one line per image: path, predicted label, latency of the model "
        "forward pass in ms (tab separated).",
    )
    parser.add_argument("model_file", help=f"{TORCHSCRIPT_FILE} written by the run (or its results directory)")
    parser.add_argument("image_folder", help="folder with the images to classify")
    parser.add_argument(
        "--classes-from",
        metavar="RUN_DIR",
        help=f"take the class names from RUN_DIR/{EXPORT_JSON} instead of those stored in the model file",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: fastest for one small image at a time; 0 = torch's default)",
    )
    args = parser.parse_args(argv)
    try:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        model, meta = load_exported(args.model_file)
        classes = _classes_from(args.classes_from) if args.classes_from else meta.get("classes")
        images = list_images(args.image_folder)
        if not images:
            raise PredictError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {args.image_folder!r}")
        meta_input = meta.get("input") or {}
        if not meta_input:
            raise PredictError(f"{args.model_file!r} holds no {EXPORT_JSON} metadata; was it written by export_model?")
        height, width = meta_input["image_size"]
        with torch.no_grad():
            warm = torch.zeros(1, int(meta_input["in_channels"]), height, width)
            for _ in range(3):  # TorchScript optimises the graph during its first calls
                model(warm)
            latencies = []
            for path in images:
                try:
                    x = preprocess(path, meta_input)
                except PredictError:
                    raise
                except Exception as exc:  # one unreadable file must not stop the others
                    print(f"{path}\tERROR: cannot read image: {exc}\t-", flush=True)
                    continue
                t0 = time.perf_counter()
                logits = model(x)
                ms = (time.perf_counter() - t0) * 1000.0
                latencies.append(ms)
                k = int(logits.argmax(1))
                label = classes[k] if classes and k < len(classes) else str(k)
                print(f"{path}\t{label}\t{ms:.3f} ms", flush=True)
    except PredictError as exc:
        print(f"fedmetanas-predict: error: {exc}", file=sys.stderr)
        return 2
    if not latencies:
        print("fedmetanas-predict: error: no image could be read", file=sys.stderr)
        return 1
    lat = sorted(latencies)
    print(
        f"{len(lat)} image(s); model latency median {lat[len(lat) // 2]:.3f} ms per image "
        f"(CPU, {torch.get_num_threads()} thread(s))",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(predict_main())
