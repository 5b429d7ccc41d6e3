"""A run config's validation set, carved from the clients' partitions.

The clients (ClientApp) and the server (validation for tuning) must cut exactly the same splits, so
both build them from ``DataSpec.from_config`` of the same run config.
"""

from __future__ import annotations

from ..run.config import RunConfig
from . import DataSpec, ImageData, load_client_data


def validation_set(cfg: RunConfig) -> ImageData:
    """The union of every client's local test split: held out of all training, taken from the
    clients' training data, never from the global test set; what tuning scores trials on."""
    specs = [DataSpec.from_config(cfg, {"partition-id": pid}) for pid in range(cfg.num_partitions)]
    return ImageData.concat([load_client_data(spec).test for spec in specs])
