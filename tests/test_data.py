"""Behaviour of fedmetanas_core.data: loading, caching, partitioning, client splits, batching."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmetanas_core import data as D
from fedmetanas_core.data.spec import RUN_CONFIG_FIELDS

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared/data/cifar10"
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "fox": (30, 30, 200)}


pytestmark = pytest.mark.usefixtures("fresh_data_caches")  # no test sees another's caches or the user's


def make_tree(root: Path, train_per_class=4, test_per_class=2, size=(6, 6), mode="RGB") -> Path:
    """A tiny imagefolder: one solid colour per class, with a little per-image noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (*size, 3)), 0, 255)
                img = Image.fromarray(pixels.astype(np.uint8))
                img.convert(mode).save(folder / f"{i}.png")
    return root


def label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=labels.max() + 1) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


# --- global datasets --------------------------------------------------------------------------


def test_digits_shapes_classes_and_normalisation():
    train, test = D.load_dataset("digits")
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape == (1437, 1, 8, 8) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64
    assert train.classes == tuple(str(i) for i in range(10)) and train.num_classes == 10
    assert (train.in_channels, train.image_size) == (1, 8)
    assert abs(train.x.mean().item()) < 1e-4 and abs(train.x.std().item() - 1) < 1e-3
    # Stratified 20% test split: every class has 36 +- 1 test examples.
    assert np.all(np.abs(np.bincount(test.y.numpy()) - 36) <= 1)


def test_digits_test_split_is_fixed_whatever_the_seed():
    _, test_a = D.load_dataset("digits", train_subset=100, subset_seed=1)
    train_b, test_b = D.load_dataset("digits", train_subset=100, subset_seed=2)
    D.clear_caches()
    train_c, test_c = D.load_dataset("digits", train_subset=100, subset_seed=2)
    assert torch.equal(test_a.x, test_b.x) and torch.equal(test_a.y, test_c.y)
    assert torch.equal(train_b.x, train_c.x)  # subsets are deterministic by seed


def test_train_subset_is_stratified_and_seeded():
    full, _ = D.load_dataset("digits")
    a, _ = D.load_dataset("digits", train_subset=200, subset_seed=1)
    b, _ = D.load_dataset("digits", train_subset=200, subset_seed=2)
    assert len(a) == len(b) == 200
    assert not torch.equal(a.y, b.y) or not torch.equal(a.x, b.x)
    expected = np.bincount(full.y.numpy()) * 200 / len(full)
    assert np.all(np.abs(np.bincount(a.y.numpy()) - expected) <= 1.5)


def test_unknown_dataset_and_missing_data_dir_are_named():
    with pytest.raises(D.DataError, match="dataset='nope'.*cifar10"):
        D.load_dataset("nope")
    with pytest.raises(D.DataError, match="data-dir"):
        D.load_dataset("mnist", "")
    with pytest.raises(D.DataError, match="on-corrupt-image"):
        D.load_dataset("digits", on_corrupt_image="ignore")


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim | (0x08 << 8)  # unsigned byte data
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_torchvision_files_without_downloading(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(10))
    train, test = D.load_dataset("mnist", str(tmp_path), image_size=14)
    assert train.x.shape == (20, 1, 14, 14) and test.x.shape == (10, 1, 14, 14)
    assert train.y.tolist() == (np.arange(20) % 10).tolist() and train.num_classes == 10


# --- imagefolder --------------------------------------------------------------------------------


def test_imagefolder_loads_a_png_tree(tmp_path):
    root = make_tree(tmp_path / "tree")
    train, test = D.load_dataset("imagefolder", str(root))
    assert train.classes == ("cat", "dog", "fox")
    assert train.x.shape == (12, 3, 6, 6) and test.x.shape == (6, 3, 6, 6)
    assert train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.allclose(train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    # Colour survives decoding: "cat" images are the reddest.
    red_minus_blue = (test.x[:, 0] - test.x[:, 2]).mean(dim=(1, 2))
    assert int(red_minus_blue.argmax()) in (0, 1)


def test_imagefolder_resizes_and_keeps_grayscale(tmp_path):
    root = make_tree(tmp_path / "gray", mode="L")
    Image.new("L", (9, 5)).save(root / "train" / "cat" / "odd-size.png")
    train, test = D.load_dataset("imagefolder", str(root))
    assert train.x.shape == (13, 1, 6, 6) and test.in_channels == 1
    D.clear_caches()
    train, test = D.load_dataset("imagefolder", str(root), image_size=16)
    assert train.x.shape == (13, 1, 16, 16) and test.x.shape == (6, 1, 16, 16)


def test_imagefolder_without_train_folder_names_data_dir(tmp_path):
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(D.DataError, match=r"data-dir.*train/"):
        D.load_dataset("imagefolder", str(tmp_path))


def test_imagefolder_without_test_folder(tmp_path):
    root = make_tree(tmp_path / "tree", train_per_class=5)
    shutil.rmtree(root / "test")
    with pytest.raises(D.DataError, match="test"):
        D.load_dataset("imagefolder", str(root))
    own = D.load_client_data(D.DataSpec(dataset="imagefolder", data_dir=str(root), seed=3))
    sizes = (len(own.train), len(own.query), len(own.test))
    assert sum(sizes) == 15 and min(sizes) >= 1


def test_corrupt_image_fails_or_is_skipped(tmp_path):
    root = make_tree(tmp_path / "tree")
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(D.DataError, match="broken.png"):
        D.load_dataset("imagefolder", str(root))
    with pytest.warns(UserWarning, match="broken.png"):
        train, _ = D.load_dataset("imagefolder", str(root), on_corrupt_image="skip")
    assert len(train) == 12
    # The decode cache remembers the skip: a later run still warns, and "fail" still fails.
    D.clear_caches()
    with pytest.warns(UserWarning, match="broken.png"):
        D.load_dataset("imagefolder", str(root), on_corrupt_image="skip")
    D.clear_caches()
    with pytest.raises(D.DataError, match="broken.png"):
        D.load_dataset("imagefolder", str(root))


def test_imagefolder_decodes_once_then_uses_the_disk_cache(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree")
    first, _ = D.load_dataset("imagefolder", str(root))
    cache_files = list((root / D.CACHE_DIRNAME).glob("imagefolder-*.pt"))
    assert len(cache_files) == 1
    assert list((root / D.CACHE_DIRNAME).iterdir()) == cache_files  # atomic write left no temp file

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    D.clear_caches()
    second, _ = D.load_dataset("imagefolder", str(root))
    assert opened == [] and torch.equal(first.x, second.x)

    # Changing the tree invalidates the cache instead of serving stale tensors.
    Image.new("RGB", (6, 6), (255, 255, 255)).save(root / "train" / "fox" / "new.png")
    D.clear_caches()
    third, _ = D.load_dataset("imagefolder", str(root))
    assert len(opened) > 0 and len(third) == 13


def test_read_only_cache_falls_back_to_user_cache(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree")
    (root / D.CACHE_DIRNAME).write_text("a file where the cache folder should be")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback must be silent
        D.load_dataset("imagefolder", str(root))
    assert list((tmp_path / "xdg-cache" / "fedmetanas").glob("imagefolder-*.pt"))


def test_hf_local_imagefolder_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    root = make_tree(tmp_path / "tree")
    spec = f"imagefolder:{root}"
    train, test = D.load_dataset("hf", str(tmp_path / "cache"), hf_dataset=spec)
    assert train.classes == ("cat", "dog", "fox")
    assert train.x.shape == (12, 3, 6, 6) and test.x.shape == (6, 3, 6, 6)
    assert np.bincount(train.y.numpy()).tolist() == [4, 4, 4]
    # Same pixels as the imagefolder loader, up to example order.
    ref, _ = D.load_dataset("imagefolder", str(root))
    for label in range(3):
        assert torch.allclose(train.x[train.y == label].mean(0), ref.x[ref.y == label].mean(0), atol=1e-5)

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    D.clear_caches()
    again, _ = D.load_dataset("hf", str(tmp_path / "cache"), hf_dataset=spec)
    assert opened == [] and torch.equal(again.x, train.x)

    with pytest.raises(D.DataError, match="hf-dataset"):
        D.load_dataset("hf", hf_dataset=f"imagefolder:{tmp_path / 'missing'}")


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="shared CIFAR-10 JPEGs not available")
def test_real_cifar10_jpegs(tmp_path):
    classes = ("airplane", "cat", "ship")
    for split, count in (("train", 20), ("test", 5)):
        for name in classes:
            dst = tmp_path / split / name
            dst.mkdir(parents=True)
            for src in sorted((SHARED_CIFAR10 / split / name).glob("*.jpg"))[:count]:
                shutil.copy(src, dst / src.name)
    train, test = D.load_dataset("imagefolder", str(tmp_path))
    assert train.x.shape == (60, 3, 32, 32) and test.x.shape == (15, 3, 32, 32)
    assert train.classes == classes
    assert torch.isfinite(train.x).all() and 0.5 < train.x.std().item() < 1.5


# --- partitions -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_labels() -> np.ndarray:
    train, _ = D.load_dataset("digits")
    return train.y.numpy()


@pytest.mark.parametrize("partitioner", D.PARTITIONERS)
def test_partitions_are_deterministic_disjoint_and_seeded(digit_labels, partitioner):
    parts = D.partition_indices(digit_labels, 10, partitioner, seed=1)
    D.clear_caches()
    again = D.partition_indices(digit_labels, 10, partitioner, seed=1)
    other = D.partition_indices(digit_labels, 10, partitioner, seed=2)
    assert len(parts) == 10 and all(len(p) > 0 for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=False))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=False))
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything)  # disjoint
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted
    if partitioner in ("iid", "dirichlet"):
        assert len(everything) == len(digit_labels)
    if partitioner == "shard":
        shard_size = len(digit_labels) // 20
        assert all(len(p) == 2 * shard_size for p in parts)
    train, _ = D.load_dataset("digits")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached partitions are read-only; subset must not mind
        assert len(train.subset(parts[0])) == len(parts[0])


def test_small_alpha_dirichlet_is_more_skewed_than_iid(digit_labels):
    iid = D.partition_indices(digit_labels, 10, "iid")
    skewed = D.partition_indices(digit_labels, 10, "dirichlet", dirichlet_alpha=0.1, min_partition_size=5)
    assert label_entropy(digit_labels, skewed) < label_entropy(digit_labels, iid) - 0.5


def test_pathological_gives_at_most_k_classes(digit_labels):
    parts = D.partition_indices(digit_labels, 10, "pathological", classes_per_partition=3, seed=4)
    assert all(len(np.unique(digit_labels[p])) <= 3 for p in parts)
    # First-deterministic assignment: with 10 partitions every class is used.
    assert len(np.unique(digit_labels[np.concatenate(parts)])) == 10


def test_impossible_dirichlet_names_the_settings(digit_labels):
    with pytest.raises(D.DataError, match="min-partition-size") as err:
        D.partition_indices(digit_labels, 100, "dirichlet", dirichlet_alpha=0.01, min_partition_size=10)
    assert "dirichlet-alpha" in str(err.value)


def test_bad_partition_settings(digit_labels):
    with pytest.raises(D.DataError, match="partitioner"):
        D.partition_indices(digit_labels, 4, "round-robin")
    with pytest.raises(D.DataError, match="num-partitions"):
        D.partition_indices(digit_labels[:5], 6, "iid")


# --- client splits --------------------------------------------------------------------------------


def test_split_partition_is_disjoint_and_deterministic():
    indices = np.arange(100, 200)
    train, query, test = D.split_partition(indices, seed=7, partition_id=3)
    assert (len(train), len(query), len(test)) == (60, 20, 20)
    assert np.array_equal(np.sort(np.concatenate([train, query, test])), indices)
    again = D.split_partition(indices, seed=7, partition_id=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, query, test), again, strict=False))
    other = D.split_partition(indices, seed=7, partition_id=4)
    assert not np.array_equal(test, other[2])


def test_split_partition_tiny_partitions():
    assert [len(s) for s in D.split_partition(np.array([5, 6, 7]))] == [1, 1, 1]
    with pytest.raises(D.DataError, match="partition 9.*min-partition-size"):
        D.split_partition(np.array([1, 2]), partition_id=9)
    with pytest.raises(D.DataError, match="query-fraction"):
        D.split_partition(np.arange(10), query_fraction=1.5)


def test_client_data_partitions_only_the_global_train_split():
    train, _ = D.load_dataset("digits")
    clients = [
        D.load_client_data(D.DataSpec(partitioner="iid", seed=1, partition_id=pid, num_partitions=5))
        for pid in range(5)
    ]
    assert sum(len(c.train) + len(c.query) + len(c.test) for c in clients) == len(train)
    c = clients[2]
    assert c.partition_id == 2 and c.train.classes == train.classes
    assert len(c.query) >= 1 and len(c.test) >= 1
    with pytest.raises(D.DataError, match="partition-id"):
        D.load_client_data(D.DataSpec(partition_id=5, num_partitions=5))


def test_own_data_uses_the_local_test_folder(tmp_path):
    root = make_tree(tmp_path / "tree", train_per_class=5, test_per_class=2)
    own = D.load_client_data(D.DataSpec(dataset="imagefolder", data_dir=str(root), query_fraction=0.2))
    assert (len(own.train), len(own.query), len(own.test)) == (12, 3, 6)


# --- the data spec ---------------------------------------------------------------------------------

# run-config keys that do not change which examples a client holds (batching, the server's evaluation)
NOT_CLIENT_DATA = ("batch-size", "eval-batch-size", "eval-split")
# a valid other value for every run-config key that decides a client's data
OTHER_VALUE = {
    "dataset": "mnist",
    "data-dir": "/elsewhere",
    "hf-dataset": "user/images",
    "num-partitions": 7,
    "partitioner": "iid",
    "dirichlet-alpha": 0.1,
    "classes-per-client": 3,
    "shards-per-client": 3,
    "min-partition-size": 20,
    "query-fraction": 0.3,
    "local-test-fraction": 0.1,
    "image-size": 16,
    "train-subset": 100,
    "test-subset": 50,
    "on-corrupt-image": "skip",
    "seed": 5,
}


def _client_data_keys() -> set[str]:
    from fedmetanas_core.run.config import KEYS

    return {k.name for k in KEYS if k.group == "data" and k.name not in NOT_CLIENT_DATA} | {"seed"}


def test_every_data_setting_of_the_run_config_changes_the_spec():
    """The spec is the client's cache key: a data setting it dropped would let a reused process
    serve stale splits (a run with another query-fraction getting the previous run's)."""
    from fedmetanas_core.run.config import RunConfig

    assert set(OTHER_VALUE) == _client_data_keys(), "a new data key: add it to DataSpec and OTHER_VALUE"
    assert set(RUN_CONFIG_FIELDS.values()) | {"data-dir", "num-partitions"} == _client_data_keys()
    cfg = RunConfig.from_flat({"num-partitions": 4}, check_paths=False)
    node = {"partition-id": 1}
    base = D.DataSpec.from_config(cfg, node)
    assert base == D.DataSpec.from_config(cfg, dict(node)) and hash(base) == hash(D.DataSpec.from_config(cfg, node))
    cache = {base: "cached"}
    for key, value in OTHER_VALUE.items():
        assert cfg[key] != value
        spec = D.DataSpec.from_config(cfg.replace(**{key: value}), node)
        assert spec != base and spec not in cache, f"{key} does not change the client's data spec"
    # the node's own data-dir, its partition id and, for its own data, its node id are part of it too
    assert D.DataSpec.from_config(cfg, {**node, "data-dir": "/node/data"}).data_dir == "/node/data"
    assert D.DataSpec.from_config(cfg, {"partition-id": 2}) != base
    own = D.DataSpec.from_config(cfg, {}, node_id=42)
    assert own.own_data and own.client_id == 42 and own != D.DataSpec.from_config(cfg, {}, node_id=43)


def test_spec_fields_are_named_and_defaulted_like_the_run_config():
    from fedmetanas_core.run.config import RunConfig

    spec = D.DataSpec()
    for name, key in RUN_CONFIG_FIELDS.items():
        assert name == key.replace("-", "_") and getattr(spec, name) == RunConfig.from_flat({})[key]
    by_id = D.DataSpec.from_config(RunConfig.from_flat({}, check_paths=False), {"partition-id": 1, "num-partitions": 3})
    assert (by_id.partition_id, by_id.num_partitions, by_id.client_id, by_id.own_data) == (1, 3, 1, False)
    with pytest.raises(ValueError, match="together"):
        D.DataSpec(partition_id=1)


def test_query_and_local_test_fractions_of_the_spec_decide_the_splits():
    sizes = {}
    for q, t in ((0.2, 0.2), (0.3, 0.2), (0.2, 0.1)):
        c = D.load_client_data(
            D.DataSpec(partitioner="iid", query_fraction=q, local_test_fraction=t, partition_id=0, num_partitions=2)
        )
        sizes[q, t] = (len(c.train), len(c.query), len(c.test))
    assert len(set(sizes.values())) == 3
    assert sizes[0.3, 0.2][1] > sizes[0.2, 0.2][1] and sizes[0.2, 0.1][2] < sizes[0.2, 0.2][2]


# --- batches ----------------------------------------------------------------------------------------


def test_batch_stream_visits_every_example_once_per_epoch():
    data = D.ImageData(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10), tuple("abcdefghij"))
    stream = D.BatchStream(data, 4, torch.Generator().manual_seed(0))
    assert stream.batches_per_epoch == 3
    epochs = []
    for _ in range(2):
        ys = [stream.next_batch()[1] for _ in range(3)]
        assert [len(y) for y in ys] == [4, 4, 2]
        epochs.append(torch.cat(ys))
        assert sorted(epochs[-1].tolist()) == list(range(10))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    replay = D.batches(data, 4, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([next(replay)[1] for _ in range(3)]), epochs[0])

    whole = D.BatchStream(data, 64, torch.Generator())
    x, y = whole.next_batch()
    assert len(y) == 10 and torch.equal(whole.next_batch()[1], y)
    with pytest.raises(D.DataError, match="batch-size"):
        D.BatchStream(data, 0)


@pytest.mark.slow  # a fresh interpreter
def test_data_module_never_imports_flwr():
    code = (
        "import sys, numpy as np; from fedmetanas_core import data; "
        "data.partition_indices(np.arange(40) % 4, 4, 'dirichlet', min_partition_size=1); "
        "assert not [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')], 'flwr imported'"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
