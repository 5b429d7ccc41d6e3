"""DARTS cell search space: ops, CPU kernels, the fast-path switch, the weights-only supernet and the
architecture logits apart.

- ``fastpath``: the process-wide fast-path / reference-path switch (the only place it is kept);
- ``kernels``: the fast path's CPU kernels (depthwise-conv gradients, pooling, concatenation);
- ``ops``: the candidate ops by name;
- ``topology``: ``SpaceConfig`` and ``CellTopology`` (nodes, edges, input pairs);
- ``supernet``: cells of mixed edges and the supernet, driven by ``CellWeights``;
- ``model``: ``SearchModel``, the supernet plus its architecture logits, and ``RelaxSettings``;
- ``relaxation``: the continuous relaxation of the architecture logits (Gumbel-Softmax, softmax,
  straight-through) and the server-owned temperature schedule.

The shared names (op names, cell types, ``net.``/``arch.`` prefixes, edge keys) live in the
torch-free ``fedmetanas_core.names`` and are re-exported here.
"""

from ..names import ARCH_PREFIX, CELL_TYPES, NET_PREFIX, PRIMITIVES, arch_param_name, edge_key, is_arch
from .fastpath import CHANNELS_LAST_DEVICES, fast_path, fast_path_enabled, set_fast_path, to_fast_layout
from .kernels import cat_channels
from .model import Architecture, RelaxSettings, SearchModel
from .ops import DilConv, FactorizedReduce, FullConv, PoolBN, ReLUConvBN, SepConv, Zero, make_op
from .supernet import CellBase, CellSlot, CellWeights, MixedEdge, SearchCell, Supernet, cell_plan
from .topology import CellTopology, SpaceConfig

__all__ = [
    "ARCH_PREFIX",
    "CELL_TYPES",
    "CHANNELS_LAST_DEVICES",
    "NET_PREFIX",
    "PRIMITIVES",
    "Architecture",
    "CellBase",
    "CellSlot",
    "CellTopology",
    "CellWeights",
    "DilConv",
    "FactorizedReduce",
    "FullConv",
    "MixedEdge",
    "PoolBN",
    "ReLUConvBN",
    "RelaxSettings",
    "SearchCell",
    "SearchModel",
    "SepConv",
    "SpaceConfig",
    "Supernet",
    "Zero",
    "arch_param_name",
    "cat_channels",
    "cell_plan",
    "edge_key",
    "fast_path",
    "fast_path_enabled",
    "is_arch",
    "make_op",
    "set_fast_path",
    "to_fast_layout",
]
