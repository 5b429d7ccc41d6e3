"""Datasets, federated partitions and minibatch streams.

Everything a client or the server needs to turn a dataset name into tensors lives here, without
importing Flower, so the same code serves simulation, deployment and plain unit tests.

- ``images``: ``ImageData`` (a labelled image set as two tensors) and ``DataError``;
- ``sources``: ``load_dataset``, dataset names to normalised train/test tensors, cached per process;
- ``decode_cache``: image files decoded once per machine, into an on-disk tensor cache;
- ``partition``: ``partition_indices``, flwr-datasets partitioners, seeded and cached;
- ``spec``: ``DataSpec``, everything that decides a client's data (from the run and node config);
- ``clients``: ``ClientData``, a partition (or a device's own data) split into train/query/test,
  loaded from a ``DataSpec`` by ``load_client_data``; ``load_test_set``, the server's global test split;
- ``node_cache``: ``node_data``, a node's ``ClientData`` loaded once per spec, in a bounded cache;
- ``minibatches``: ``BatchStream``, endless shuffled minibatches.
- ``run_data``: a run config's validation set, carved from the clients' partitions (the same
  splits on the clients and the server).
"""

from ..run.config import CORRUPT_IMAGE_POLICIES, DATASETS, PARTITIONERS
from . import partition as _partition
from . import sources as _sources
from .clients import ClientData, load_client_data, load_test_set, split_partition
from .decode_cache import CACHE_DIR_ENV, CACHE_DIRNAME
from .images import DataError, ImageData
from .minibatches import BatchStream, batches
from .node_cache import NODE_DATA, node_data
from .partition import partition_indices
from .sources import load_dataset, load_splits
from .spec import DataSpec

__all__ = [
    "CACHE_DIRNAME",
    "CACHE_DIR_ENV",
    "CORRUPT_IMAGE_POLICIES",
    "DATASETS",
    "NODE_DATA",
    "PARTITIONERS",
    "BatchStream",
    "ClientData",
    "DataError",
    "DataSpec",
    "ImageData",
    "batches",
    "clear_caches",
    "load_client_data",
    "load_dataset",
    "load_splits",
    "load_test_set",
    "node_data",
    "partition_indices",
    "split_partition",
]


def clear_caches() -> None:
    """Forget in-process datasets, partitions and nodes' data (disk caches stay); for tests and long runs."""
    NODE_DATA.clear()
    _sources._FULL_CACHE.clear()
    _sources._DATASET_CACHE.clear()
    _partition._PARTITION_CACHE.clear()
