"""The on-disk cache of decoded images: image files are decoded once per machine, not every run.

Decoded tensors go to ``<data-dir>/.fedmetanas-cache/`` (or the user cache when the data folder is
marked read-only, or ``$FEDMETANAS_CACHE_DIR``), written atomically so that concurrent clients never
read half a file. Corrupt images fail the load or are skipped (``on-corrupt-image``), and a skip is
remembered in the cache.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..util.atomic import atomic_write
from .images import DataError

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".fedmetanas-cache"
# Overrides where decoded-image caches go (e.g. when the data folder is shared or read-only).
CACHE_DIR_ENV = "FEDMETANAS_CACHE_DIR"
# Bump when the cache payload or decoding changes, so stale files are never read.
CACHE_VERSION = 1

# A loader's raw output: train x, train y, test x (or None), test y (or None), class names.
# x is uint8 in 0..255 or float in [0, 1], shaped [N, C, H, W].
RawSplits = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", tuple[str, ...]]
# Images to decode: (encoded sources: paths or bytes, names for messages, labels).
EncodedImages = tuple[list[Any], list[str], list[int]]


def decode_cached(
    cache_name: str,
    data_dir: str,
    classes: tuple[str, ...],
    train_source: Callable[[], EncodedImages],
    test_source: Callable[[], EncodedImages] | None,
    image_size: int,
    on_corrupt_image: str,
) -> RawSplits:
    """Decode both splits unless a matching disk cache exists. Sources are callables so that a
    cache hit does not even read the encoded images.

    Skipped images are recorded in the cache, so a later run still warns about them, and a run
    with on-corrupt-image='fail' still fails on them instead of silently using the cache.
    """
    cache_dirs = _cache_dirs(data_dir)
    payload = _read_cache(cache_dirs, cache_name)
    if payload is None:
        payload = _decode_splits(train_source(), test_source() if test_source else None, image_size, on_corrupt_image)
        _write_cache(cache_dirs, cache_name, payload)
    elif payload["skipped"]:
        skipped = payload["skipped"]
        if on_corrupt_image == "fail":
            raise DataError(
                f"cannot decode image {skipped[0]} (and {len(skipped) - 1} more); fix or remove "
                f"them, or set on-corrupt-image='skip'"
            )
        warnings.warn(
            f"skipping {len(skipped)} unreadable image(s) (from the decode cache): "
            f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
            stacklevel=3,
        )
    return payload["train_x"], payload["train_y"], payload["test_x"], payload["test_y"], classes


def _decode_splits(
    train_source: EncodedImages,
    test_source: EncodedImages | None,
    image_size: int,
    on_corrupt_image: str,
) -> dict[str, Any]:
    size = (image_size, image_size) if image_size else None
    train_x, train_y, train_gray, skipped = _decode_images(*train_source, size, on_corrupt_image)
    test_x = test_y = None
    gray = train_gray
    if test_source is not None:
        size = tuple(train_x.shape[1:3])  # the test split must match the train split's shape
        test_x, test_y, test_gray, test_skipped = _decode_images(*test_source, size, on_corrupt_image)
        skipped += test_skipped
        gray = gray and test_gray

    def to_nchw(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        return (x[..., :1] if gray else x).permute(0, 3, 1, 2).contiguous()

    return {
        "version": CACHE_VERSION,
        "train_x": to_nchw(train_x),
        "train_y": train_y,
        "test_x": to_nchw(test_x),
        "test_y": test_y,
        "skipped": skipped,
    }


def _decode_images(
    sources: list[Any],
    names: list[str],
    labels: list[int],
    size: tuple[int, int] | None,
    on_corrupt_image: str,
) -> tuple[torch.Tensor, torch.Tensor, bool, list[str]]:
    """Decode to uint8 [N, H, W, 3] in one plain loop; resize to `size` (default: the first image's).

    Returns (images, labels, all_grayscale, skipped names).
    """
    from PIL import Image

    out: np.ndarray | None = None
    keep = np.zeros(len(sources), dtype=bool)
    skipped: list[str] = []
    all_gray = True
    for i, (src, name) in enumerate(zip(sources, names, strict=False)):
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
                all_gray = all_gray and img.mode in ("1", "L")
                rgb = img.convert("RGB")  # forces the full decode, so truncation surfaces here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if on_corrupt_image == "fail":
                raise DataError(
                    f"cannot decode image {name}: {exc}. Fix or remove the file, or set on-corrupt-image='skip'"
                ) from exc
            warnings.warn(f"skipping unreadable image {name}: {exc}", stacklevel=2)
            skipped.append(name)
            continue
        if size is None:
            size = (rgb.height, rgb.width)
        if (rgb.height, rgb.width) != size:
            rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        if out is None:
            out = np.empty((len(sources), size[0], size[1], 3), dtype=np.uint8)
        out[i] = np.asarray(rgb)
        keep[i] = True
    if out is None:
        raise DataError(f"no readable images among {len(sources)} file(s), e.g. {names[:3]}")
    return (
        torch.from_numpy(out[keep]),
        torch.tensor(labels, dtype=torch.long)[torch.from_numpy(keep)],
        all_gray,
        skipped,
    )


def _cache_dirs(data_dir: str) -> list[Path]:
    """Where decoded tensors may live, preferred first; the user cache covers read-only data dirs."""
    if os.environ.get(CACHE_DIR_ENV):
        return [Path(os.environ[CACHE_DIR_ENV])]
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedmetanas"
    return ([Path(data_dir) / CACHE_DIRNAME] if data_dir and _marked_writable(data_dir) else []) + [user_cache]


def _marked_writable(directory: str) -> bool:
    """A data folder marked read-only (no owner write bit) is left untouched, even for root."""
    try:
        return bool(os.stat(directory).st_mode & stat.S_IWUSR)
    except OSError:
        return False


def _read_cache(cache_dirs: list[Path], cache_name: str) -> dict[str, Any] | None:
    for directory in cache_dirs:
        path = directory / cache_name
        if not path.is_file():
            continue
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged cache is only a lost speed-up: decode again
            warnings.warn(f"ignoring unreadable decode cache {path}: {exc}", stacklevel=3)
            continue
        if isinstance(payload, dict) and payload.get("version") == CACHE_VERSION:
            log.debug("loaded decoded images from %s", path)
            return payload
    return None


def _write_cache(cache_dirs: list[Path], cache_name: str, payload: dict[str, Any]) -> None:
    """Write atomically into the first folder that takes it, so concurrent clients never read half a
    file; readable by all (other users may share the data dir)."""
    errors = []
    for directory in cache_dirs:
        try:
            atomic_write(directory / cache_name, lambda f: torch.save(payload, f), mode=0o644)
            return
        except OSError as exc:
            errors.append(f"{directory}: {exc}")
    warnings.warn(
        f"could not write the decoded-image cache ({'; '.join(errors)}); images will be decoded again next run",
        stacklevel=3,
    )
