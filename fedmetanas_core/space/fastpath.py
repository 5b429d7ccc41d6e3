"""The process-wide switch between the supernet's fast path and the plain eager reference path.

Speed (docs/speed-fast-path.md, ``python -m benchmarks.speed``): by default forward passes take a fast path
that computes the same function with the same parameters, generator draws and active ops (equal
within float rounding; tests/test_speed_paths.py) on fewer, cheaper kernels (``space.kernels``):
channels_last activations on CPU, depthwise-conv gradients and the 3x3 average pool on oneDNN's fast
depthwise kernels, dense gradients out of every channel concatenation, the mixing weight folded into
each op's last BatchNorm, and one ReLU per cell state shared by all conv ops that read it.
``set_fast_path(False)`` / ``with fast_path(False):`` selects the plain eager reference path (the
straightforward DARTS code), e.g. to compare the two or to trace the modules.

The switch lives here and only here; every other module asks ``fast_path_enabled()``.
"""

from __future__ import annotations

import contextlib

import torch

_FAST = True
CHANNELS_LAST_DEVICES: set[str] = {"cpu"}  # device types whose activations go channels_last on the fast path


def set_fast_path(enabled: bool) -> None:
    """Process-wide: True (default) = fast path, False = the plain eager reference path."""
    global _FAST
    _FAST = bool(enabled)


def fast_path_enabled() -> bool:
    return _FAST


@contextlib.contextmanager
def fast_path(enabled: bool = True):
    previous = _FAST
    set_fast_path(enabled)
    try:
        yield
    finally:
        set_fast_path(previous)


def to_fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Network input in the fast path's memory format (channels_last where that pays: oneDNN on CPU)."""
    if _FAST and x.dim() == 4 and x.device.type in CHANNELS_LAST_DEVICES:
        return x.contiguous(memory_format=torch.channels_last)
    return x
