"""Dataset sources: a dataset name (and folder) turned into normalised train and test tensors.

Loaded once per process (module-level caches keyed by everything that changes the content); image
files are decoded once per machine through the on-disk cache (``decode_cache``), because a federated
run asks for the same data every round and from every simulated client.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..run.config import CORRUPT_IMAGE_POLICIES, DATASETS
from .decode_cache import CACHE_VERSION, EncodedImages, RawSplits, decode_cached
from .images import DataError, ImageData

_TORCHVISION_CLASSES = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}

# Full (not subsetted) splits, keyed by everything that changes their content; test may be None.
_FULL_CACHE: dict[tuple, tuple[ImageData, ImageData | None]] = {}
# What load_dataset returned, keyed by all of its arguments.
_DATASET_CACHE: dict[tuple, tuple[ImageData, ImageData]] = {}


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
    atomically (``decode_cache``), so images are never decoded every round or every run.

    Subsets are drawn after loading, so they never change the normalisation statistics.
    """
    key = (name, _abspath(data_dir), hf_dataset, image_size, train_subset, test_subset, subset_seed, on_corrupt_image)
    if key in _DATASET_CACHE:
        return _DATASET_CACHE[key]
    for setting, value in (("train-subset", train_subset), ("test-subset", test_subset)):
        if value < 0:
            raise DataError(f"{setting} must be >= 0 (0 = use everything); got {value}")
    train, test = load_splits(
        name, data_dir, hf_dataset=hf_dataset, image_size=image_size, on_corrupt_image=on_corrupt_image
    )
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


def load_splits(
    name: str, data_dir: str, *, hf_dataset: str, image_size: int, on_corrupt_image: str
) -> tuple[ImageData, ImageData | None]:
    """Load and normalise whole splits once per process; test is None when the source has none."""
    if name not in DATASETS:
        raise DataError(f"dataset={name!r} is unknown; choose one of {', '.join(DATASETS)}")
    if on_corrupt_image not in CORRUPT_IMAGE_POLICIES:
        raise DataError(
            f"on-corrupt-image={on_corrupt_image!r} is unknown; choose one of {', '.join(CORRUPT_IMAGE_POLICIES)}"
        )
    if image_size < 0:
        raise DataError(f"image-size must be >= 0 (0 = native size); got {image_size}")
    if name in ("imagefolder",) + tuple(_TORCHVISION_CLASSES) and not data_dir:
        raise DataError(f"dataset={name!r} needs data-dir (the folder holding its files)")

    key = (
        name,
        "" if name == "digits" else _abspath(data_dir),
        hf_dataset if name == "hf" else "",
        image_size,
        on_corrupt_image,
    )
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
        resized[start : start + 4096] = F.interpolate(
            x[start : start + 4096],
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
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


def _load_digits() -> RawSplits:
    """sklearn's 8x8 digits with a fixed 20% test split, identical whatever the run seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=bunch.target, random_state=0)
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    classes = tuple(str(c) for c in bunch.target_names)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], classes


def _load_torchvision(name: str, data_dir: str) -> RawSplits:
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


def _load_imagefolder(data_dir: str, image_size: int, on_corrupt_image: str) -> RawSplits:
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
            raise DataError(f"data-dir={data_dir!r}: test/ has classes missing from train/: {', '.join(extra)}")
        test_samples = make_dataset(test_dir, class_to_idx, IMG_EXTENSIONS, allow_empty=True)

    fingerprint = hashlib.sha256(f"imagefolder\0{CACHE_VERSION}\0{root}\0{image_size}\0".encode())
    fingerprint.update("\0".join(classes).encode())
    for path, label in train_samples + [("test", -1)] + test_samples:
        if label >= 0:
            stat = os.stat(path)
            fingerprint.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        else:
            fingerprint.update(b"--test--\n")
    cache_name = f"imagefolder-{fingerprint.hexdigest()[:24]}.pt"

    def source(samples: list[tuple[str, int]]) -> EncodedImages:
        return [p for p, _ in samples], [p for p, _ in samples], [lab for _, lab in samples]

    return decode_cached(
        cache_name,
        data_dir,
        tuple(classes),
        lambda: source(train_samples),
        (lambda: source(test_samples)) if test_samples else None,
        image_size,
        on_corrupt_image,
    )


def _load_hf(hf_dataset: str, data_dir: str, image_size: int, on_corrupt_image: str) -> RawSplits:
    """Load a Hugging Face dataset ("owner/name" from the local HF cache, or "builder:/dir")."""
    if not hf_dataset:
        raise DataError("dataset='hf' needs hf-dataset (e.g. 'uoft-cs/cifar10' or 'imagefolder:/abs/dir')")
    datasets = import_hf_datasets()
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

    def source(split: Any, split_name: str) -> EncodedImages:
        # Undecoded bytes/paths, so decoding goes through the same corrupt-image handling.
        cells = split.cast_column(image_col, datasets.Image(decode=False))[image_col][:]
        sources, names = [], []
        for i, cell in enumerate(cells):
            sources.append(cell["bytes"] if cell["bytes"] is not None else cell["path"])
            names.append(cell["path"] or f"{hf_dataset}[{split_name}][{i}]")
        labels = [int(v) for v in split[label_col][:]]
        if labels and min(labels) < 0:
            raise DataError(
                f"hf-dataset={hf_dataset!r}: the {split_name} split has unlabelled "
                f"examples (label -1); pick a dataset whose splits are labelled"
            )
        return sources, names, labels

    fingerprint = hashlib.sha256(
        f"hf\0{CACHE_VERSION}\0{hf_dataset}\0{image_size}\0{image_col}\0{label_col}\0"
        f"{train._fingerprint}\0{test._fingerprint if test is not None else ''}".encode()
    )
    cache_name = f"hf-{fingerprint.hexdigest()[:24]}.pt"
    return decode_cached(
        cache_name,
        data_dir,
        classes,
        lambda: source(train, "train"),
        (lambda: source(test, "test")) if test is not None else None,
        image_size,
        on_corrupt_image,
    )


def _abspath(path: str) -> str:
    return str(Path(path).resolve()) if path else ""


def import_hf_datasets() -> Any:
    """Import Hugging Face `datasets` offline by default: these machines may have no internet."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets
