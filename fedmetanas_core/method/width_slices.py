"""One set of weights for networks of several widths: a narrow network is a slice of the wide one.

Device tiers (``method.tiers``) search at different widths and share their weights, as HeteroFL
shares a CNN's: tier ``t`` at width ``c`` trains the slice of the widest tier's tensors (width
``C``) that its own tensors' shapes select, and the server averages every element over the clients
that trained it.

Which slice: every channel dimension of these networks is a concatenation of blocks of the width
(stem: 3 blocks; a cell's output: one per node; a reduction doubles the block count), so a
dimension of ``k x C`` channels keeps the first ``c`` of each of its ``k`` blocks. The producer of a
feature map (a conv's output dimension) and its consumers (the next convs' input dimensions) have
the same size, so they pick the same channels: the narrow network *is* the wide one with the other
channels zeroed (tested: same logits). Dimensions of equal size on both sides (kernels, classes,
image channels) are kept whole.
"""

from __future__ import annotations

import numpy as np

State = dict[str, np.ndarray]


def channel_index(narrow: int, wide: int, width: int, wide_width: int) -> np.ndarray:
    """Indices into a dimension of size ``wide`` (width ``wide_width``) that its ``narrow`` version
    (width ``width``) keeps."""
    if narrow == wide:
        return np.arange(wide)
    blocks, rest = divmod(wide, wide_width)
    if rest or blocks * width != narrow or width > wide_width:
        raise ValueError(
            f"a dimension of {narrow} channels at width {width} is not a slice of {wide} channels at width {wide_width}"
        )
    return (np.arange(blocks)[:, None] * wide_width + np.arange(width)[None, :]).reshape(-1)


def slice_indices(narrow_shape: tuple[int, ...], wide_shape: tuple[int, ...], width: int, wide_width: int):
    """The ``np.ix_`` index of a narrow tensor inside its wide one."""
    if len(narrow_shape) != len(wide_shape):
        raise ValueError(f"shapes {narrow_shape} and {wide_shape} differ in rank")
    return np.ix_(*(channel_index(n, w, width, wide_width) for n, w in zip(narrow_shape, wide_shape, strict=True)))


def narrow_state(
    wide: State, shapes: dict[str, tuple[int, ...]], width: int, wide_width: int, keys: list[str] | None = None
) -> State:
    """The narrow network's tensors (``shapes``: its state's shapes) cut from the wide state."""
    out = {}
    for key in keys if keys is not None else list(shapes):
        value = wide[key]
        out[key] = (
            value.copy() if value.ndim == 0 else value[slice_indices(shapes[key], value.shape, width, wide_width)]
        )
    return out


def aggregate_slices(wide: State, replies: list[tuple[State, int, float]], wide_width: int) -> State:
    """Every element of ``wide`` averaged (weighted by each reply's weight, e.g. its examples) over the
    replies that trained it; an element no reply trained keeps its value. A reply is (its narrow
    state, its width, its weight) and may hold only some of ``wide``'s keys (pruned ops stay home)."""
    out = {}
    for key, value in wide.items():
        total = np.zeros(value.shape, dtype=np.float64)
        weight = np.zeros(value.shape, dtype=np.float64)
        for state, width, w in replies:
            if key not in state:
                continue
            part = state[key]
            index = () if value.ndim == 0 else slice_indices(part.shape, value.shape, width, wide_width)
            total[index] += w * part.astype(np.float64)
            weight[index] += w
        mean = np.where(weight > 0, total / np.maximum(weight, 1e-300), value.astype(np.float64))
        out[key] = (np.rint(mean) if value.dtype.kind in "iu" else mean).astype(value.dtype)
    return out
