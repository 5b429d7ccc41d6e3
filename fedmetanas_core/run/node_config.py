"""A SuperNode's node config (``--node-config``): checked once, before any data is loaded."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .config_keys import TIER_KINDS

# the budget a device can run (device tiers, ``method.tiers``): at most one of these
NODE_BUDGET_KEYS = {f"budget-{kind}": kind for kind in TIER_KINDS}
NODE_CONFIG_KEYS = ("partition-id", "num-partitions", "data-dir", *NODE_BUDGET_KEYS)


def validate_node_config(node_config: Mapping[str, Any], cfg: RunConfig | None = None) -> dict[str, Any]:
    """Check a SuperNode's node config once, before any data is loaded; returns it normalised.

    ``partition-id``: int >= 0; ``num-partitions``: int >= 1 and > partition-id; ``data-dir``: an
    existing, readable folder; ``budget-macs`` or ``budget-params`` (one of them): a number > 0, what
    the device can run (its tier). Other keys pass through (Flower or a deployment may add some), except
    misspellings of these (``partition_id``), which would silently change which data is used.
    With the run config, ``partition-id`` must also fit its ``num-partitions`` and, when the run
    config does not fix the number of partitions, ``partition-id`` needs ``num-partitions``.
    Raises ``ConfigError`` naming the key (source ``node-config``).
    """
    out = dict(node_config)
    for name in out:
        canonical = str(name).strip().lower().replace("_", "-")
        if canonical in NODE_CONFIG_KEYS and name != canonical:
            raise ConfigError(name, out[name], f"unknown key; did you mean '{canonical}'?", "node-config")

    def as_int(key: str, low: int) -> int | None:
        if key not in out:
            return None
        raw = out[key]
        value = raw
        if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():  # Flower's legacy proxy sends strings
            value = int(raw.strip())
        elif isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, raw, "must be an integer", "node-config")
        if value < low:
            raise ConfigError(key, raw, f"must be >= {low}", "node-config")
        out[key] = value
        return value

    budgets = [key for key in NODE_BUDGET_KEYS if key in out]
    if len(budgets) > 1:
        raise ConfigError(
            budgets[1], out[budgets[1]], f"declare one budget, not both {' and '.join(budgets)}", "node-config"
        )
    for key in budgets:
        raw = out[key]
        try:
            value = float(raw.strip()) if isinstance(raw, str) else float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        if isinstance(raw, bool) or not (value > 0 and value != float("inf")):
            raise ConfigError(key, raw, "must be a number > 0 (what this device can run)", "node-config")
        out[key] = value
    pid = as_int("partition-id", 0)
    num = as_int("num-partitions", 1)
    if num is not None and pid is not None and pid >= num:
        raise ConfigError("partition-id", pid, f"must be < num-partitions ({num})", "node-config")
    if cfg is not None and pid is not None:
        if cfg.num_partitions and pid >= cfg.num_partitions:
            raise ConfigError(
                "partition-id", pid, f"must be < the run config's num-partitions ({cfg.num_partitions})", "node-config"
            )
        if not cfg.num_partitions and num is None:
            raise ConfigError(
                "num-partitions",
                None,
                "required with partition-id (or set the run config's num-partitions)",
                "node-config",
            )
    if "data-dir" in out:
        raw = out["data-dir"]
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError("data-dir", raw, "must be the path of an existing folder", "node-config")
        root = Path(raw).expanduser()
        if not root.is_dir():
            raise ConfigError("data-dir", raw, "must be an existing folder", "node-config")
        if not os.access(root, os.R_OK | os.X_OK):
            raise ConfigError("data-dir", raw, "folder is not readable", "node-config")
        if cfg is not None and cfg.dataset == "imagefolder" and not (root / "train").is_dir():
            raise ConfigError(
                "data-dir", raw, "imagefolder needs a 'train/' subfolder (test/ is optional on a node)", "node-config"
            )
    return out
