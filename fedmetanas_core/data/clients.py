"""One client's data: its partition split three ways (train / query / local test), or a device's
own dataset split the same way."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .images import DataError, ImageData
from .partition import partition_indices
from .sources import load_dataset, load_splits
from .spec import DataSpec


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
        return ImageData.concat([self.train, self.query])


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
    train, query, test = _random_split(
        indices, (query_fraction, test_fraction), ("query-fraction", "local-test-fraction"), seed, partition_id
    )
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
    for setting, fraction in zip(settings, fractions, strict=False):
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


def load_client_data(spec: DataSpec) -> ClientData:
    """The client's data that ``spec`` names: its partition of the global training split (the global
    test split is never given to clients), or a device's own dataset (``spec.own_data``)."""
    return _own_data(spec) if spec.own_data else _partition_data(spec)


def load_test_set(spec: DataSpec) -> ImageData:
    """The global test split of the spec's dataset (``test-subset`` of it): the server's, never a client's."""
    return _load_dataset(spec)[1]


def _load_dataset(spec: DataSpec) -> tuple[ImageData, ImageData]:
    return load_dataset(
        spec.dataset,
        spec.data_dir,
        hf_dataset=spec.hf_dataset,
        image_size=spec.image_size,
        train_subset=spec.train_subset,
        test_subset=spec.test_subset,
        subset_seed=spec.seed,
        on_corrupt_image=spec.on_corrupt_image,
    )


def _partition_data(spec: DataSpec) -> ClientData:
    """Simulation / 'partition by id' path: partition ``partition_id`` of the global TRAIN split."""
    pid, num = spec.partition_id, spec.num_partitions
    if not 0 <= pid < num:
        raise DataError(f"partition-id={pid} must be in [0, num-partitions={num})")
    train, _ = _load_dataset(spec)
    parts = partition_indices(
        train.y.numpy(),
        num,
        spec.partitioner,
        dirichlet_alpha=spec.dirichlet_alpha,
        classes_per_partition=spec.classes_per_client,
        shards_per_partition=spec.shards_per_client,
        min_partition_size=spec.min_partition_size,
        seed=spec.seed,
    )
    train_idx, query_idx, test_idx = split_partition(
        parts[pid],
        query_fraction=spec.query_fraction,
        test_fraction=spec.local_test_fraction,
        seed=spec.seed,
        partition_id=pid,
    )
    return ClientData(train.subset(train_idx), train.subset(query_idx), train.subset(test_idx), pid)


def _own_data(spec: DataSpec) -> ClientData:
    """Deployment path: a device's own dataset (e.g. an imagefolder at data_dir) is the whole partition:
    its train split is split into train/query, and its test/ split is the local test set (if present).

    Without a test split, local-test-fraction of the train split becomes the local test set instead.
    ``spec.node_id`` identifies the device: it seeds the client's random streams and keys its results
    on the server, so two devices must not share it. The splits of the device's own data depend on
    ``seed`` only, so they stay the same if the device rejoins under a new id. The partitioner and
    the subsets do not apply: the device's data is all of its partition.
    """
    train, test = load_splits(
        spec.dataset,
        spec.data_dir,
        hf_dataset=spec.hf_dataset,
        image_size=spec.image_size,
        on_corrupt_image=spec.on_corrupt_image,
    )
    everything = np.arange(len(train))
    if len(train) < 3:
        raise DataError(
            f"dataset={spec.dataset!r} at data-dir={spec.data_dir!r} has {len(train)} training "
            f"example(s); a device needs at least 3 (train, query and test)"
        )
    if test is None:
        train_idx, query_idx, test_idx = split_partition(
            everything, query_fraction=spec.query_fraction, test_fraction=spec.local_test_fraction, seed=spec.seed
        )
        test = train.subset(test_idx)
    else:
        train_idx, query_idx = _random_split(everything, (spec.query_fraction,), ("query-fraction",), spec.seed, 0)
    return ClientData(train.subset(train_idx), train.subset(query_idx), test, spec.node_id)
