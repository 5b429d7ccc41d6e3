"""Datasets, federated partitions and minibatch streams.

Everything a client or the server needs to turn a dataset name into tensors lives here, without
importing Flower, so the same code serves simulation, deployment and plain unit tests. Images are
decoded once per process (and, for image files, once per machine via an on-disk tensor cache),
because a federated run asks for the same data every round and from every simulated client.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "hf")
PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")
CORRUPT_IMAGE_POLICIES = ("fail", "skip")

CACHE_DIRNAME = ".fedmetanas-cache"
# Overrides where decoded-image caches go (e.g. when the data folder is shared or read-only).
CACHE_DIR_ENV = "FEDMETANAS_CACHE_DIR"
# Bump when the cache payload or decoding changes, so stale files are never read.
_CACHE_VERSION = 1

_TORCHVISION_CLASSES = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


class DataError(ValueError):
    """Bad data or data settings; message names the setting/path."""


@dataclass(frozen=True)
class ImageData:
    """A labelled image set held as two tensors, so batching is plain indexing."""

    x: torch.Tensor  # float32 [N, C, H, W], normalised with the dataset's train mean/std
    y: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None = None  # the normalisation, for models deployed outside the app
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"ImageData needs x [N, C, H, W] and y [N]; got x {tuple(self.x.shape)}, "
                f"y {tuple(self.y.shape)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[2])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: Any) -> ImageData:
        """Examples at the given integer indices (array, list or tensor), as copies."""
        if isinstance(idx, torch.Tensor):
            index = idx.long()
        else:  # copied, so read-only arrays (e.g. cached partitions) are fine
            index = torch.from_numpy(np.array(idx, dtype=np.int64).reshape(-1))
        return ImageData(self.x[index], self.y[index], self.classes, self.mean, self.std)


# --------------------------------------------------------------------------------------------
# Global datasets
# --------------------------------------------------------------------------------------------

# Full (not subsetted) splits, keyed by everything that changes their content; test may be None.
_FULL_CACHE: dict[tuple, tuple[ImageData, ImageData | None]] = {}
# What load_dataset returned, keyed by all of its arguments.
_DATASET_CACHE: dict[tuple, tuple[ImageData, ImageData]] = {}
_PARTITION_CACHE: dict[tuple, list[np.ndarray]] = {}


def clear_caches() -> None:
    """Forget in-process datasets and partitions (disk caches stay); for tests and long runs."""
    _FULL_CACHE.clear()
    _DATASET_CACHE.clear()
    _PARTITION_CACHE.clear()


def load_dataset(
    name: str,
    data_dir: str = "",
    *,
    hf_dataset: str = "",
    image_size: int = 0,
    train_subset: int = 0,
    test_subset: int = 0,
    subset_seed: int = 0,
    on_corrupt_image: str = "fail",
) -> tuple[ImageData, ImageData]:
    """(train, test). Decoded once per process (module-level cache keyed by the arguments) and, for
    image files, also cached on disk as a tensor file under data_dir/.fedmetanas-cache/ written
    atomically (write tmp then os.replace), so images are never decoded every round or every run.

    Subsets are drawn after loading, so they never change the normalisation statistics.
    """
    key = (name, _abspath(data_dir), hf_dataset, image_size, train_subset, test_subset,
           subset_seed, on_corrupt_image)
    if key in _DATASET_CACHE:
        return _DATASET_CACHE[key]
    for setting, value in (("train-subset", train_subset), ("test-subset", test_subset)):
        if value < 0:
            raise DataError(f"{setting} must be >= 0 (0 = use everything); got {value}")
    train, test = _load_full(name, data_dir, hf_dataset=hf_dataset, image_size=image_size,
                             on_corrupt_image=on_corrupt_image)
    if test is None:
        where = f"hf-dataset={hf_dataset!r}" if name == "hf" else f"data-dir={data_dir!r}"
        raise DataError(
            f"dataset={name!r} at {where} has no test split (imagefolder needs a non-empty "
            f"test/ folder; hf datasets need a 'test' or 'validation' split)"
        )
    if 0 < train_subset < len(train):
        train = train.subset(_stratified_subset(train.y, train_subset, subset_seed))
    if 0 < test_subset < len(test):
        test = test.subset(_stratified_subset(test.y, test_subset, subset_seed))
    _DATASET_CACHE[key] = (train, test)
    return train, test


def _load_full(
    name: str, data_dir: str, *, hf_dataset: str, image_size: int, on_corrupt_image: str
) -> tuple[ImageData, ImageData | None]:
    """Load and normalise whole splits once per process; test is None when the source has none."""
    if name not in DATASETS:
        raise DataError(f"dataset={name!r} is unknown; choose one of {', '.join(DATASETS)}")
    if on_corrupt_image not in CORRUPT_IMAGE_POLICIES:
        raise DataError(
            f"on-corrupt-image={on_corrupt_image!r} is unknown; choose one of "
            f"{', '.join(CORRUPT_IMAGE_POLICIES)}"
        )
    if image_size < 0:
        raise DataError(f"image-size must be >= 0 (0 = native size); got {image_size}")
    if name in ("imagefolder",) + tuple(_TORCHVISION_CLASSES) and not data_dir:
        raise DataError(f"dataset={name!r} needs data-dir (the folder holding its files)")

    key = (name, "" if name == "digits" else _abspath(data_dir),
           hf_dataset if name == "hf" else "", image_size, on_corrupt_image)
    if key in _FULL_CACHE:
        return _FULL_CACHE[key]

    if name == "digits":
        raw = _load_digits()
    elif name in _TORCHVISION_CLASSES:
        raw = _load_torchvision(name, data_dir)
    elif name == "imagefolder":
        raw = _load_imagefolder(data_dir, image_size, on_corrupt_image)
    else:
        raw = _load_hf(hf_dataset, data_dir, image_size, on_corrupt_image)
    result = _normalise(*raw, image_size=image_size)
    _FULL_CACHE[key] = result
    return result


# A loader's raw output: train x, train y, test x (or None), test y (or None), class names.
# x is uint8 in 0..255 or float in [0, 1], shaped [N, C, H, W].
_Raw = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", tuple[str, ...]]


def _normalise(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor | None,
    test_y: torch.Tensor | None,
    classes: tuple[str, ...],
    *,
    image_size: int,
) -> tuple[ImageData, ImageData | None]:
    """Resize and standardise with the train split's per-channel statistics (never the test's)."""
    train_x = _to_unit_float(train_x, image_size)
    mean = train_x.mean(dim=(0, 2, 3), dtype=torch.float64).float()
    std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    shift, scale = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    stats = (tuple(mean.tolist()), tuple(std.tolist()))
    train = ImageData(train_x.sub_(shift).div_(scale), train_y.long(), classes, *stats)
    if test_x is None or test_y is None:
        return train, None
    test_x = _to_unit_float(test_x, image_size)
    return train, ImageData(test_x.sub_(shift).div_(scale), test_y.long(), classes, *stats)


def _to_unit_float(x: torch.Tensor, image_size: int) -> torch.Tensor:
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if not image_size or tuple(x.shape[2:]) == (image_size, image_size):
        return x.contiguous()
    resized = x.new_empty((x.shape[0], x.shape[1], image_size, image_size))
    for start in range(0, len(x), 4096):  # chunks keep the temporary memory small
        resized[start:start + 4096] = F.interpolate(
            x[start:start + 4096], size=(image_size, image_size), mode="bilinear",
            align_corners=False, antialias=True,
        )
    return resized


def _stratified_subset(labels: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """n indices keeping class proportions: take each class's examples in a random order, by the
    fraction of that class already taken, so every class is drawn from at the same rate."""
    y = labels.numpy()
    perm = np.random.default_rng(seed).permutation(len(y))
    y_perm = y[perm]
    counts = np.bincount(y_perm)
    by_class = np.argsort(y_perm, kind="stable")
    rank = np.empty(len(y), dtype=np.int64)
    rank[by_class] = np.arange(len(y)) - (np.cumsum(counts) - counts)[y_perm[by_class]]
    taken_fraction = rank / counts[y_perm]
    return np.sort(perm[np.argsort(taken_fraction, kind="stable")[:n]])


def _load_digits() -> _Raw:
    """sklearn's 8x8 digits with a fixed 20% test split, identical whatever the run seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=bunch.target, random_state=0
    )
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    classes = tuple(str(c) for c in bunch.target_names)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], classes


def _load_torchvision(name: str, data_dir: str) -> _Raw:
    """Read torchvision's stored arrays directly; per-item PIL transforms would be ~100x slower."""
    import torchvision.datasets

    dataset_cls = getattr(torchvision.datasets, _TORCHVISION_CLASSES[name])
    splits = []
    for train in (True, False):
        try:
            ds = dataset_cls(root=data_dir, train=train, download=True)
        except (RuntimeError, OSError) as exc:  # URLError is an OSError
            raise DataError(
                f"could not find or download dataset={name!r} in data-dir={data_dir!r}: {exc}. "
                f"Without internet, put torchvision's files for {name} there first."
            ) from exc
        x = torch.as_tensor(np.asarray(ds.data))
        # MNIST-like data is [N, H, W]; CIFAR is [N, H, W, C].
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        splits.append((x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)))
    (train_x, train_y), (test_x, test_y) = splits
    return train_x, train_y, test_x, test_y, tuple(ds.classes)


# --- image files: imagefolder trees and Hugging Face datasets ---------------------------------

# Images to decode: (encoded sources: paths or bytes, names for messages, labels).
_Source = tuple[list[Any], list[str], list[int]]


def _load_imagefolder(data_dir: str, image_size: int, on_corrupt_image: str) -> _Raw:
    """Decode data_dir/{train,test}/<class>/* once and keep the tensors in a disk cache."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(data_dir).resolve()
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir():
        raise DataError(
            f"data-dir={data_dir!r} has no train/ folder; dataset='imagefolder' needs "
            f"data-dir/train/<class>/<image> (and data-dir/test/<class>/<image>)"
        )
    try:
        classes, class_to_idx = find_classes(train_dir)
    except FileNotFoundError as exc:
        raise DataError(f"data-dir={data_dir!r}: train/ has no class folders ({exc})") from exc
    train_samples = make_dataset(train_dir, class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    if not train_samples:
        raise DataError(f"data-dir={data_dir!r}: train/ holds no images ({', '.join(IMG_EXTENSIONS)})")
    test_samples: list[tuple[str, int]] = []
    if test_dir.is_dir():
        extra = sorted(e.name for e in os.scandir(test_dir) if e.is_dir() and e.name not in class_to_idx)
        if extra:
            raise DataError(
                f"data-dir={data_dir!r}: test/ has classes missing from train/: {', '.join(extra)}"
            )
        test_samples = make_dataset(test_dir, class_to_idx, IMG_EXTENSIONS, allow_empty=True)

    fingerprint = hashlib.sha256(f"imagefolder\0{_CACHE_VERSION}\0{root}\0{image_size}\0".encode())
    fingerprint.update("\0".join(classes).encode())
    for path, label in train_samples + [("test", -1)] + test_samples:
        if label >= 0:
            stat = os.stat(path)
            fingerprint.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        else:
            fingerprint.update(b"--test--\n")
    cache_name = f"imagefolder-{fingerprint.hexdigest()[:24]}.pt"

    def source(samples: list[tuple[str, int]]) -> _Source:
        return [p for p, _ in samples], [p for p, _ in samples], [lab for _, lab in samples]

    return _decode_cached(
        cache_name, data_dir, tuple(classes), lambda: source(train_samples),
        (lambda: source(test_samples)) if test_samples else None, image_size, on_corrupt_image,
    )


def _load_hf(hf_dataset: str, data_dir: str, image_size: int, on_corrupt_image: str) -> _Raw:
    """Load a Hugging Face dataset ("owner/name" from the local HF cache, or "builder:/dir")."""
    if not hf_dataset:
        raise DataError("dataset='hf' needs hf-dataset (e.g. 'uoft-cs/cifar10' or 'imagefolder:/abs/dir')")
    datasets = _import_datasets()
    builder, sep, local_dir = hf_dataset.partition(":")
    try:
        if sep and builder and "/" not in builder:
            if not Path(local_dir).is_dir():
                raise DataError(f"hf-dataset={hf_dataset!r}: {local_dir!r} is not a directory")
            dsd = datasets.load_dataset(builder, data_dir=local_dir)
        else:
            dsd = datasets.load_dataset(hf_dataset)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types for "not found / offline"
        raise DataError(
            f"could not load hf-dataset={hf_dataset!r}: {exc}. HF_DATASETS_OFFLINE defaults to 1, so "
            f"hub datasets must already be in the Hugging Face cache."
        ) from exc
    if "train" not in dsd:
        raise DataError(f"hf-dataset={hf_dataset!r} has no 'train' split (splits: {', '.join(dsd)})")
    train = dsd["train"]
    test = dsd["test"] if "test" in dsd else dsd.get("validation")

    features = train.features
    image_col = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((c for c in ("label", "fine_label") if c in features), None) or next(
        (c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None
    )
    if image_col is None or label_col is None:
        raise DataError(
            f"hf-dataset={hf_dataset!r} needs an Image column and a label column (a ClassLabel, "
            f"or one named 'label'/'fine_label'); columns: {dict(features)}"
        )
    if isinstance(features[label_col], datasets.ClassLabel):
        classes = tuple(features[label_col].names)
    else:
        top = max(max(train[label_col][:]), max(test[label_col][:]) if test is not None else 0)
        classes = tuple(str(i) for i in range(top + 1))

    def source(split: Any, split_name: str) -> _Source:
        # Undecoded bytes/paths, so decoding goes through the same corrupt-image handling.
        cells = split.cast_column(image_col, datasets.Image(decode=False))[image_col][:]
        sources, names = [], []
        for i, cell in enumerate(cells):
            sources.append(cell["bytes"] if cell["bytes"] is not None else cell["path"])
            names.append(cell["path"] or f"{hf_dataset}[{split_name}][{i}]")
        labels = [int(v) for v in split[label_col][:]]
        if labels and min(labels) < 0:
            raise DataError(f"hf-dataset={hf_dataset!r}: the {split_name} split has unlabelled "
                            f"examples (label -1); pick a dataset whose splits are labelled")
        return sources, names, labels

    fingerprint = hashlib.sha256(
        f"hf\0{_CACHE_VERSION}\0{hf_dataset}\0{image_size}\0{image_col}\0{label_col}\0"
        f"{train._fingerprint}\0{test._fingerprint if test is not None else ''}".encode()
    )
    cache_name = f"hf-{fingerprint.hexdigest()[:24]}.pt"
    return _decode_cached(
        cache_name, data_dir, classes, lambda: source(train, "train"),
        (lambda: source(test, "test")) if test is not None else None, image_size, on_corrupt_image,
    )


def _decode_cached(
    cache_name: str,
    data_dir: str,
    classes: tuple[str, ...],
    train_source: Callable[[], _Source],
    test_source: Callable[[], _Source] | None,
    image_size: int,
    on_corrupt_image: str,
) -> _Raw:
    """Decode both splits unless a matching disk cache exists. Sources are callables so that a
    cache hit does not even read the encoded images.

    Skipped images are recorded in the cache, so a later run still warns about them, and a run
    with on-corrupt-image='fail' still fails on them instead of silently using the cache.
    """
    cache_dirs = _cache_dirs(data_dir)
    payload = _read_cache(cache_dirs, cache_name)
    if payload is None:
        payload = _decode_splits(train_source(), test_source() if test_source else None,
                                 image_size, on_corrupt_image)
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
    train_source: _Source,
    test_source: _Source | None,
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

    return {"version": _CACHE_VERSION, "train_x": to_nchw(train_x), "train_y": train_y,
            "test_x": to_nchw(test_x), "test_y": test_y, "skipped": skipped}


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
    for i, (src, name) in enumerate(zip(sources, names)):
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
                all_gray = all_gray and img.mode in ("1", "L")
                rgb = img.convert("RGB")  # forces the full decode, so truncation surfaces here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if on_corrupt_image == "fail":
                raise DataError(
                    f"cannot decode image {name}: {exc}. Fix or remove the file, or set "
                    f"on-corrupt-image='skip'"
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
    return (torch.from_numpy(out[keep]), torch.tensor(labels, dtype=torch.long)[torch.from_numpy(keep)],
            all_gray, skipped)


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
        if isinstance(payload, dict) and payload.get("version") == _CACHE_VERSION:
            log.debug("loaded decoded images from %s", path)
            return payload
    return None


def _write_cache(cache_dirs: list[Path], cache_name: str, payload: dict[str, Any]) -> None:
    """Write atomically (tmp file + os.replace) so concurrent clients never read half a file."""
    errors = []
    for directory in cache_dirs:
        tmp = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=cache_name, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; other users may share the data dir
            os.replace(tmp, directory / cache_name)
            return
        except OSError as exc:
            errors.append(f"{directory}: {exc}")
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    warnings.warn(
        f"could not write the decoded-image cache ({'; '.join(errors)}); images will be "
        f"decoded again next run",
        stacklevel=3,
    )


def _abspath(path: str) -> str:
    return str(Path(path).resolve()) if path else ""


def _import_datasets() -> Any:
    """Import Hugging Face `datasets` offline by default: these machines may have no internet."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str = "dirichlet",
    *,
    dirichlet_alpha: float = 0.5,
    classes_per_partition: int = 2,
    shards_per_partition: int = 2,
    min_partition_size: int = 10,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split example indices into num_partitions disjoint, sorted int64 arrays with flwr-datasets.

    Rows are shuffled by `seed` before partitioning, so every partitioner (IID included, which
    otherwise cuts contiguous blocks) is seeded. "pathological" uses the first-deterministic class
    assignment: partition i always gets class i % num_classes, so every class is used whenever
    there are at least as many partitions as classes. Results are cached in-process because every
    simulated client asks for the same partitioning.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0)):
        raise DataError("partition labels must be a 1-D array of non-negative integers")
    if partitioner not in PARTITIONERS:
        raise DataError(f"partitioner={partitioner!r} is unknown; choose one of {', '.join(PARTITIONERS)}")
    if not 1 <= num_partitions <= len(labels):
        raise DataError(
            f"num-partitions={num_partitions} must be between 1 and the number of training "
            f"examples ({len(labels)})"
        )
    labels = labels.astype(np.int64)
    key = (hashlib.sha1(labels.tobytes()).hexdigest(), num_partitions, partitioner,
           float(dirichlet_alpha), classes_per_partition, shards_per_partition,
           min_partition_size, seed)
    if key not in _PARTITION_CACHE:
        _PARTITION_CACHE[key] = _partition(labels, num_partitions, partitioner,
                                           dirichlet_alpha=dirichlet_alpha,
                                           classes_per_partition=classes_per_partition,
                                           shards_per_partition=shards_per_partition,
                                           min_partition_size=min_partition_size, seed=seed)
    return list(_PARTITION_CACHE[key])


def _partition(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    *,
    dirichlet_alpha: float,
    classes_per_partition: int,
    shards_per_partition: int,
    min_partition_size: int,
    seed: int,
) -> list[np.ndarray]:
    datasets = _import_datasets()
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    order = np.random.default_rng(seed).permutation(len(labels))
    features = datasets.Features({"label": datasets.ClassLabel(num_classes=int(labels.max()) + 1),
                                  "index": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"label": labels[order], "index": order}, features=features)

    if partitioner == "iid":
        part = IidPartitioner(num_partitions)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(num_partitions, partition_by="label", alpha=dirichlet_alpha,
                                    min_partition_size=min_partition_size, self_balancing=True,
                                    seed=seed)
    elif partitioner == "pathological":
        part = PathologicalPartitioner(num_partitions, partition_by="label",
                                       num_classes_per_partition=classes_per_partition,
                                       class_assignment_mode="first-deterministic", seed=seed)
    else:
        part = ShardPartitioner(num_partitions, partition_by="label",
                                num_shards_per_partition=shards_per_partition, seed=seed)
    part.dataset = ds
    try:
        with warnings.catch_warnings():
            # The Dirichlet partitioner warns on every re-sampling attempt; failure is reported below.
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            # pyarrow deprecation noise from the shard partitioner's sort.
            warnings.filterwarnings("ignore", message="Specifying null_placement", category=FutureWarning)
            parts = [part.load_partition(i)[:]["index"] for i in range(num_partitions)]
    except ValueError as exc:
        if partitioner == "dirichlet" and "max number of attempts" in str(exc):
            raise DataError(
                f"the Dirichlet partitioner could not give all {num_partitions} partitions at least "
                f"min-partition-size={min_partition_size} examples (dirichlet-alpha={dirichlet_alpha}) "
                f"in 10 attempts; raise dirichlet-alpha, lower min-partition-size or lower "
                f"num-partitions"
            ) from exc
        raise DataError(
            f"partitioner={partitioner!r} cannot split {len(labels)} examples into "
            f"num-partitions={num_partitions} (classes-per-partition={classes_per_partition}, "
            f"shards-per-partition={shards_per_partition}): {exc}"
        ) from exc
    result = []
    for indices in parts:
        array = np.sort(np.asarray(indices, dtype=np.int64))
        array.flags.writeable = False  # shared through the cache
        result.append(array)
    return result


# --------------------------------------------------------------------------------------------
# Client data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientData:
    """One client's data, split three ways so that architecture search, meta-learning and
    reporting never evaluate on examples they trained on."""

    train: ImageData  # support batches + weight updates
    query: ImageData  # MAML query / FedNAS alpha-validation batches
    test: ImageData  # local test split: reporting and personalization only
    partition_id: int

    @cached_property
    def pool(self) -> ImageData:
        """Train and query splits together: all of the client's training data, for any training that
        does not hold the query split out (fixed networks, FedMetaNAS with query-source = train)."""
        t, q = self.train, self.query
        return ImageData(torch.cat([t.x, q.x]), torch.cat([t.y, q.y]), t.classes, t.mean, t.std)


def split_partition(
    indices: np.ndarray,
    *,
    query_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    partition_id: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train/query/test index arrays; deterministic by (seed, partition_id). Each split gets at least
    1 example when len(indices) >= 3; fewer than 3 examples -> DataError naming the partition and
    `min-partition-size`, with the documented fallback in the message."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) < 3:
        raise DataError(
            f"partition {partition_id} has {len(indices)} example(s) but needs at least 3 (one each "
            f"for train, query and test). Raise min-partition-size (the Dirichlet partitioner "
            f"re-samples until every partition has that many), lower num-partitions, or use "
            f"partitioner='iid'."
        )
    train, query, test = _random_split(indices, (query_fraction, test_fraction),
                                       ("query-fraction", "test-fraction"), seed, partition_id)
    return train, query, test


def _random_split(
    indices: np.ndarray,
    fractions: tuple[float, ...],
    settings: tuple[str, ...],
    seed: int,
    partition_id: int,
) -> list[np.ndarray]:
    """[rest, part_1, ...]: part_k gets round(n * fractions[k]) examples, at least 1, and the rest at
    least 1, trimming the largest parts when n is too small for the requested fractions."""
    for setting, fraction in zip(settings, fractions):
        if not 0.0 <= fraction < 1.0:
            raise DataError(f"{setting} must be in [0, 1); got {fraction}")
    if sum(fractions) >= 1.0:
        raise DataError(f"{' + '.join(settings)} must be < 1 so that training data remains; got {sum(fractions)}")
    n = len(indices)
    sizes = [max(1, round(n * f)) for f in fractions]
    while n - sum(sizes) < 1:
        sizes[int(np.argmax(sizes))] -= 1
    if min(sizes) < 1:
        raise DataError(f"partition {partition_id} has {n} example(s): too few to split")
    shuffled = np.random.default_rng([seed, partition_id]).permutation(indices)
    bounds = np.cumsum(sizes)
    parts = np.split(shuffled, bounds)
    rest = parts.pop()
    return [np.sort(p) for p in [rest, *parts]]


def load_client_data(
    dataset: str,
    data_dir: str,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str = "dirichlet",
    dirichlet_alpha: float = 0.5,
    classes_per_partition: int = 2,
    shards_per_partition: int = 2,
    min_partition_size: int = 10,
    query_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    hf_dataset: str = "",
    image_size: int = 0,
    train_subset: int = 0,
    test_subset: int = 0,
    on_corrupt_image: str = "fail",
) -> ClientData:
    """Simulation / 'partition by id' path: partition the global TRAIN split; the global test split is never
    given to clients."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id={partition_id} must be in [0, num-partitions={num_partitions})")
    train, _ = load_dataset(dataset, data_dir, hf_dataset=hf_dataset, image_size=image_size,
                            train_subset=train_subset, test_subset=test_subset, subset_seed=seed,
                            on_corrupt_image=on_corrupt_image)
    parts = partition_indices(train.y.numpy(), num_partitions, partitioner,
                              dirichlet_alpha=dirichlet_alpha,
                              classes_per_partition=classes_per_partition,
                              shards_per_partition=shards_per_partition,
                              min_partition_size=min_partition_size, seed=seed)
    train_idx, query_idx, test_idx = split_partition(parts[partition_id], query_fraction=query_fraction,
                                                     test_fraction=test_fraction, seed=seed,
                                                     partition_id=partition_id)
    return ClientData(train.subset(train_idx), train.subset(query_idx), train.subset(test_idx),
                      partition_id)


def load_own_data(
    dataset: str,
    data_dir: str,
    *,
    query_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    image_size: int = 0,
    on_corrupt_image: str = "fail",
    hf_dataset: str = "",
    partition_id: int = 0,
) -> ClientData:
    """Deployment path: a device's own dataset (e.g. an imagefolder at data_dir) is the whole partition:
    its train split is split into train/query, and its test/ split is the local test set (if present).

    Without a test split, test_fraction of the train split becomes the local test set instead.
    ``partition_id`` identifies the device (its node id): it seeds the client's random streams and
    keys its results on the server, so two devices must not share it. The splits of the device's
    own data depend on ``seed`` only, so they stay the same if the device rejoins under a new id.
    """
    train, test = _load_full(dataset, data_dir, hf_dataset=hf_dataset, image_size=image_size,
                             on_corrupt_image=on_corrupt_image)
    everything = np.arange(len(train))
    if len(train) < 3:
        raise DataError(f"dataset={dataset!r} at data-dir={data_dir!r} has {len(train)} training "
                        f"example(s); a device needs at least 3 (train, query and test)")
    if test is None:
        train_idx, query_idx, test_idx = split_partition(everything, query_fraction=query_fraction,
                                                         test_fraction=test_fraction, seed=seed)
        test = train.subset(test_idx)
    else:
        train_idx, query_idx = _random_split(everything, (query_fraction,), ("query-fraction",),
                                             seed, 0)
    return ClientData(train.subset(train_idx), train.subset(query_idx), test, partition_id)


# --------------------------------------------------------------------------------------------
# Minibatches
# --------------------------------------------------------------------------------------------


class BatchStream:
    """Endless shuffled minibatches over one ImageData.

    Persistent (unlike `next(iter(loader))` per step): every example is seen once per epoch, the
    order is reshuffled each epoch from `generator`, so runs are reproducible. The last batch of an
    epoch may be smaller. A batch size >= the data size yields the whole data every time.
    """

    def __init__(self, data: ImageData, batch_size: int, generator: torch.Generator | None = None):
        if batch_size < 1:
            raise DataError(f"batch-size must be >= 1; got {batch_size}")
        if len(data) == 0:
            raise DataError("cannot draw batches from an empty dataset")
        self.data = data
        self.batch_size = batch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.epoch = 0  # epochs started so far
        self._order: torch.Tensor | None = None
        self._pos = 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.data)
        if self.batch_size >= n:
            self.epoch += 1
            return self.data.x, self.data.y
        if self._order is None or self._pos >= n:
            self._order = torch.randperm(n, generator=self.generator)
            self._pos = 0
            self.epoch += 1
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.data.x[idx], self.data.y[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()


def batches(data: ImageData, batch_size: int, generator: torch.Generator | None = None) -> BatchStream:
    """Shorthand for BatchStream(data, batch_size, generator)."""
    return BatchStream(data, batch_size, generator)
