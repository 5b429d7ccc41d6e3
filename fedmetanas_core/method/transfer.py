"""What goes over the wire: only the weights a client can still run.

Once the server's permanent masks drop an op on an edge, or every input pair of a node that reads
an edge, no client computes that op again and the derived network never contains it: its weights
are neither sent nor returned, and the server keeps their last aggregate. In discrete rounds the
wire then carries the derived cell (plus the architecture logits and BatchNorm statistics), not
the supernet. Flower-free: the ServerApp and the ClientApp both call ``live_keys`` with the same
masks, so they agree on the key set without sending it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from ..names import NET_PREFIX, arch_param_name, edge_key
from ..space import SpaceConfig

# net.cells.<cell>.edges.<dst><-<src>.ops.<op>.<rest>: one op's tensors on one edge of one cell
_OP_KEY = re.compile(r"^" + re.escape(NET_PREFIX) + r"cells\.(\d+)\.edges\.(\d+)<-(\d+)\.ops\.([A-Za-z0-9_]+)\.")


def live_edges(space: SpaceConfig, masks: Mapping[str, torch.Tensor], cell_type: str) -> dict[str, list[str]]:
    """Per edge key of one cell type, the ops that may still run (empty: the edge is dead)."""
    topo = space.topology
    op_mask = masks.get(arch_param_name("alpha", cell_type))
    live: dict[str, list[str]] = {}
    for e, (j, i) in enumerate(topo.edges):
        pair_mask = masks.get(arch_param_name("beta", cell_type, j)) if space.input_pruning else None
        fed = pair_mask is None or any(
            bool(keep) and i in pair for keep, pair in zip(pair_mask.tolist(), topo.pairs(j), strict=False)
        )
        ops = [p for o, p in enumerate(space.primitives) if p != "none" and (op_mask is None or bool(op_mask[e, o]))]
        live[edge_key(j, i)] = ops if fed else []
    return live


def live_keys(space: SpaceConfig, names: Iterable[str], masks: Mapping[str, torch.Tensor]) -> list[str]:
    """The state-dict names (in the given order) a client needs under ``masks``: everything but the
    tensors of dead (edge, op)s. No masks: every name."""
    names = list(names)
    if not masks:
        return names
    cell_types = space.cell_types()
    live = {t: live_edges(space, masks, t) for t in set(cell_types)}
    out = []
    for name in names:
        m = _OP_KEY.match(name)
        if m is not None:
            cell, dst, src, op = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
            if op not in live[cell_types[cell]].get(edge_key(dst, src), ()):
                continue
        out.append(name)
    return out


def state_bytes(arrays: Iterable[np.ndarray]) -> int:
    """The arrays' own bytes (what ``bytes-sent`` / ``bytes-received`` count; no framing)."""
    return int(sum(np.asarray(a).nbytes for a in arrays))
