"""Federated partitions of a label array with flwr-datasets' partitioners, seeded and cached."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np

from ..run.config import PARTITIONERS
from .images import DataError
from .sources import import_hf_datasets

_PARTITION_CACHE: dict[tuple, list[np.ndarray]] = {}


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
            f"num-partitions={num_partitions} must be between 1 and the number of training examples ({len(labels)})"
        )
    labels = labels.astype(np.int64)
    key = (
        hashlib.sha1(labels.tobytes()).hexdigest(),
        num_partitions,
        partitioner,
        float(dirichlet_alpha),
        classes_per_partition,
        shards_per_partition,
        min_partition_size,
        seed,
    )
    if key not in _PARTITION_CACHE:
        _PARTITION_CACHE[key] = _partition(
            labels,
            num_partitions,
            partitioner,
            dirichlet_alpha=dirichlet_alpha,
            classes_per_partition=classes_per_partition,
            shards_per_partition=shards_per_partition,
            min_partition_size=min_partition_size,
            seed=seed,
        )
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
    datasets = import_hf_datasets()
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    order = np.random.default_rng(seed).permutation(len(labels))
    features = datasets.Features(
        {"label": datasets.ClassLabel(num_classes=int(labels.max()) + 1), "index": datasets.Value("int64")}
    )
    ds = datasets.Dataset.from_dict({"label": labels[order], "index": order}, features=features)

    if partitioner == "iid":
        part = IidPartitioner(num_partitions)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=dirichlet_alpha,
            min_partition_size=min_partition_size,
            self_balancing=True,
            seed=seed,
        )
    elif partitioner == "pathological":
        part = PathologicalPartitioner(
            num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    else:
        part = ShardPartitioner(
            num_partitions, partition_by="label", num_shards_per_partition=shards_per_partition, seed=seed
        )
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
            f"num-partitions={num_partitions} (classes-per-client={classes_per_partition}, "
            f"shards-per-client={shards_per_partition}): {exc}"
        ) from exc
    result = []
    for indices in parts:
        array = np.sort(np.asarray(indices, dtype=np.int64))
        array.flags.writeable = False  # shared through the cache
        result.append(array)
    return result
