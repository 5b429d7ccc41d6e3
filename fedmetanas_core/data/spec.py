"""``DataSpec``: everything that decides one client's data, in one hashable value.

Its fields are named after the run-config keys they come from (``classes_per_client`` is
``classes-per-client``), and their defaults are the run config's. The data functions take a spec
and nothing else, and a process that serves several runs caches a client's data by its spec: a
setting that changes the data is a field, so a changed setting can never reuse stale splits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..run.config import BY_NAME, RunConfig

_RUN_CONFIG = "run-config"


def _setting(key: str) -> Any:
    """A field read from the run-config key ``key``, defaulting to the run config's default."""
    return field(default=BY_NAME[key].default, metadata={_RUN_CONFIG: key})


@dataclass(frozen=True)
class DataSpec:
    """One client's data: a partition of the global training split (``partition_id`` of
    ``num_partitions``), or, with both None, a device's own dataset at ``data_dir``, identified by
    ``node_id`` (its Flower node id: its random streams and its results on the server).
    ``data_dir`` is the run config's, resolved, or the node's own.
    """

    dataset: str = _setting("dataset")
    data_dir: str = ""
    hf_dataset: str = _setting("hf-dataset")
    partitioner: str = _setting("partitioner")
    dirichlet_alpha: float = _setting("dirichlet-alpha")
    classes_per_client: int = _setting("classes-per-client")
    shards_per_client: int = _setting("shards-per-client")
    min_partition_size: int = _setting("min-partition-size")
    query_fraction: float = _setting("query-fraction")
    local_test_fraction: float = _setting("local-test-fraction")
    image_size: int = _setting("image-size")
    train_subset: int = _setting("train-subset")
    test_subset: int = _setting("test-subset")
    on_corrupt_image: str = _setting("on-corrupt-image")
    seed: int = _setting("seed")
    # which client: a partition by id, or a device's own data
    partition_id: int | None = None
    num_partitions: int | None = None
    node_id: int = 0  # own data only; 0 when partitioning by id

    def __post_init__(self) -> None:
        if (self.partition_id is None) != (self.num_partitions is None):
            raise ValueError(
                "partition_id and num_partitions go together: both set (a partition) or both None (own data)"
            )

    @property
    def own_data(self) -> bool:
        """True for a device's own dataset (no partition id)."""
        return self.partition_id is None

    @property
    def client_id(self) -> int:
        """The id the client's data carries: its partition id, or the device's node id."""
        return self.node_id if self.partition_id is None else self.partition_id

    @classmethod
    def from_config(cls, cfg: RunConfig, node_config: Mapping[str, Any] | None = None, node_id: int = 0) -> DataSpec:
        """The data of the node with ``node_config`` (``partition-id``, ``num-partitions``,
        ``data-dir``) and Flower node id ``node_id``, in the run ``cfg``.

        With ``partition-id`` the global training set is partitioned by id, into the run config's
        ``num-partitions`` or, when that is 0, the node's; otherwise the node's own dataset is the
        whole partition and ``node_id`` identifies it. The node's ``data-dir`` wins over the run's.
        """
        node_config = node_config or {}
        settings = {name: cfg[key] for name, key in RUN_CONFIG_FIELDS.items()}
        settings["data_dir"] = str(node_config.get("data-dir") or cfg.resolved_data_dir())
        if "partition-id" in node_config:
            num = cfg.num_partitions or int(node_config["num-partitions"])
            return cls(**settings, partition_id=int(node_config["partition-id"]), num_partitions=num)
        return cls(**settings, node_id=int(node_id))


# field name -> the run-config key it is read from
RUN_CONFIG_FIELDS: dict[str, str] = {
    f.name: f.metadata[_RUN_CONFIG] for f in fields(DataSpec) if _RUN_CONFIG in f.metadata
}
