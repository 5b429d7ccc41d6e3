"""A run config's data: the client partitions it names, and the validation set carved from them.

The clients (ClientApp) and the server (validation for tuning) must cut exactly the same splits, so
both build them here from the same run config.
"""

from __future__ import annotations

import torch

from .config import RunConfig
from .data import ClientData, ImageData, load_client_data, load_own_data


DATA_KEYS = (
    "dataset", "hf-dataset", "partitioner", "dirichlet-alpha", "classes-per-client", "shards-per-client",
    "min-partition-size", "query-fraction", "local-test-fraction", "image-size", "train-subset", "test-subset",
    "on-corrupt-image", "seed",
)  # fmt: skip


def data_settings(cfg: RunConfig) -> tuple:
    """Every run-config value that changes a client's data: a cache key that cannot go stale."""
    return tuple(cfg[k] for k in DATA_KEYS)


def _split_settings(cfg: RunConfig) -> dict:
    return dict(
        query_fraction=cfg.query_fraction, test_fraction=cfg.local_test_fraction, seed=cfg.seed,
        hf_dataset=cfg.hf_dataset, image_size=cfg.image_size, on_corrupt_image=cfg.on_corrupt_image,
    )  # fmt: skip


def partition_data(cfg: RunConfig, data_dir: str, partition_id: int, num_partitions: int) -> ClientData:
    """Partition ``partition_id`` of the global training split (simulation, or nodes given an id)."""
    return load_client_data(
        cfg.dataset, data_dir, partition_id, num_partitions, partitioner=cfg.partitioner,
        dirichlet_alpha=cfg.dirichlet_alpha, classes_per_partition=cfg.classes_per_client,
        shards_per_partition=cfg.shards_per_client, min_partition_size=cfg.min_partition_size,
        train_subset=cfg.train_subset, **_split_settings(cfg),
    )  # fmt: skip


def own_data(cfg: RunConfig, data_dir: str, client_id: int = 0) -> ClientData:
    """A device's own dataset at ``data_dir``, the whole of it its partition, identified by
    ``client_id`` (the node id in a deployment: distinct random streams and results per device)."""
    return load_own_data(cfg.dataset, data_dir, partition_id=client_id, **_split_settings(cfg))


def validation_set(cfg: RunConfig) -> ImageData:
    """The union of every client's local test split: held out of all training, taken from the
    clients' training data, never from the global test set; what tuning scores trials on."""
    splits = [partition_data(cfg, cfg.resolved_data_dir(), pid, cfg.num_partitions).test for pid in range(cfg.num_partitions)]
    first = splits[0]
    return ImageData(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]), first.classes, first.mean, first.std)
