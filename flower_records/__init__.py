"""Flower records to and from the core's plain state: the one place both apps convert.

The core (fedmetanas_core) is Flower-free: it works on ``{name: numpy array}`` or torch state
dicts, and on a round's plain values (``coordinator.plan_to_config``: the plan, its masks as flat
bool lists). The ServerApp and the ClientApp send ``ArrayRecord`` s and ``ConfigRecord`` s. Here:

- arrays: ``array_record`` / ``numpy_state`` (numpy), ``torch_state`` (torch, as a model loads it);
- live keys: ``select``, the arrays a round carries (pruned ops stay home) or a reply in the sent order;
- the round plan and its masks: ``round_record`` (plain values -> ConfigRecord) and ``round_plan``
  (ConfigRecord -> ``RoundPlan``, masks shaped like the arrays they prune).

Both apps import this package and neither imports the other (``tests/test_layering.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedmetanas_core.federation.coordinator import plan_from_config
from fedmetanas_core.method.training import RoundPlan


def array_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays, in ``state``'s key order (C-contiguous: Flower serialises the buffer)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def numpy_state(record: ArrayRecord, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """``{name: numpy array}`` of an ArrayRecord (only ``keys`` when given), in its key order. Each
    array is freshly deserialised: the caller may change it in place."""
    wanted = None if keys is None else set(keys)
    return {k: v.numpy() for k, v in record.items() if wanted is None or k in wanted}


def torch_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of an ArrayRecord, in its key order: what ``load_state_dict`` takes."""
    return dict(record.to_torch_state_dict())


def select(record: ArrayRecord, keys: Iterable[str]) -> ArrayRecord:
    """The record's arrays named by ``keys``, in that order (shared, not copied): a round's live
    arrays, or a reply put in the sent key order (Flower's DP pairs arrays by position)."""
    return ArrayRecord({k: record[k] for k in keys})


def round_record(*values: Mapping[str, Any]) -> ConfigRecord:
    """A round's ConfigRecord from plain values (the model config, the phase's round config with its
    plan and masks), later mappings winning."""
    merged: dict[str, Any] = {}
    for part in values:
        merged.update(part)
    return ConfigRecord(merged)


def round_plan(config: ConfigRecord | Mapping[str, Any], arrays: Mapping[str, Any]) -> RoundPlan:
    """The ``RoundPlan`` a round's config carries; each mask shaped like the array it prunes."""
    return plan_from_config(dict(config), {k: v.shape for k, v in arrays.items()})
