"""One client's data: its partition split three ways (train / query / local test), or a device's
own dataset split the same way."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .images import DataError, ImageData
from .partition import partition_indices
from .sources import load_dataset, load_splits


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
    train, test = load_splits(dataset, data_dir, hf_dataset=hf_dataset, image_size=image_size,
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
