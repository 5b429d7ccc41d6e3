"""Flower records to and from the core's plain state: the one place both apps convert arrays.

The core (fedmetanas_core) is Flower-free and works on ``{name: numpy array}`` or torch state dicts;
the ServerApp and the ClientApp send ``ArrayRecord`` s. Both apps import this package and neither
imports the other.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays, in ``state``'s key order (C-contiguous: Flower serialises the buffer)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def numpy_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: numpy array}`` of an ArrayRecord, in its key order."""
    return {k: v.numpy() for k, v in record.items()}
