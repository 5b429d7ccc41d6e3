"""The weights-only supernet: stem, search cells of mixed edges, classifier.

Architecture weights are no parameters here: they arrive as forward arguments (``CellWeights`` per
cell type, made by ``SearchModel`` from its architecture logits), so the same supernet serves any
relaxation, mask or one-hot choice. The derived network (``genotype.DiscreteNetwork``) shares the
network's plan (``cell_plan``) and cell inputs (``CellBase``), hence its parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..names import edge_key
from .fastpath import fast_path_enabled, to_fast_layout
from .kernels import CatChannels
from .ops import TAKES_RELU, FactorizedReduce, ReLUConvBN, make_op, norm_layer
from .topology import SpaceConfig


@dataclass
class CellWeights:
    """What one cell type's forward needs: the effective weight per (edge, op) and which to run."""

    weights: torch.Tensor  # [edges, ops]: pair coefficient x op weight
    active: list[list[int]]  # per edge, indices of ops that run
    _scalars: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)

    def scalar(self, e: int, o: int) -> torch.Tensor:
        """``weights[e, o]``; one unbind per forward (shared by the cells of a type), not a select per op."""
        if self._scalars is None:
            self._scalars = self.weights.reshape(-1).unbind()
        return self._scalars[e * self.weights.shape[1] + o]


@dataclass(frozen=True)
class CellSlot:
    """One cell's place in the network: its type and channel counts (shared by supernet and derived net)."""

    cell_type: str
    c_pp: int
    c_p: int
    c: int
    reduction: bool
    reduction_prev: bool


class Stem(nn.Sequential):
    """Conv + normalisation, its output in the fast path's memory format. On a one-channel input (digits)
    a channels_last tensor is also contiguous, so the convolution returns NCHW and every op after it
    would run on the slow layout (max pooling 3-5x slower, a local step ~1.4x): the output is laid out
    again here, once, for the supernet and the derived network alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_fast_layout(super().forward(to_fast_layout(x)))


def cell_plan(space: SpaceConfig, norm: str | None = None) -> tuple[Stem, list[CellSlot], int]:
    """The stem (its normalisation ``norm``, default the space's), each cell's slot (channels double
    at reduction cells), and the head's input width."""
    c_cur = space.stem_multiplier * space.init_channels
    stem = Stem(nn.Conv2d(space.in_channels, c_cur, 3, padding=1, bias=False), norm_layer(norm or space.norm, c_cur))
    c_pp, c_p, c = c_cur, c_cur, space.init_channels
    slots, reduction_prev = [], False
    for cell_type in space.cell_types():
        reduction = cell_type == "reduce"
        c = 2 * c if reduction else c
        slots.append(CellSlot(cell_type, c_pp, c_p, c, reduction, reduction_prev))
        reduction_prev = reduction
        c_pp, c_p = c_p, space.num_nodes * c
    return stem, slots, c_p


class CellBase(nn.Module):
    """A cell's two inputs brought to ``c`` channels (the older one halved after a reduction cell);
    the search cell and the derived cell add their edges after these."""

    def __init__(self, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool, norm: str):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(c_pp, c, norm) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0, norm)
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0, norm)

    def input_states(self, s0: torch.Tensor, s1: torch.Tensor) -> list[torch.Tensor]:
        return [self.preprocess0(s0), self.preprocess1(s1)]


class MixedEdge(nn.Module):
    def __init__(self, primitives: tuple[str, ...], c: int, stride: int, norm: str):
        super().__init__()
        self.ops = nn.ModuleDict({p: make_op(p, c, stride, norm) for p in primitives if p != "none"})
        self.index = {p: i for i, p in enumerate(primitives)}


class SearchCell(CellBase):
    def __init__(self, space: SpaceConfig, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__(c_pp, c_p, c, reduction, reduction_prev, space.supernet_norm)
        topo = space.topology
        self.edge_list = topo.edges
        self.nodes = list(topo.nodes)
        self.edges = nn.ModuleDict(
            {
                edge_key(j, i): MixedEdge(space.primitives, c, 2 if reduction and i < 2 else 1, space.supernet_norm)
                for j, i in topo.edges
            }
        )
        self.primitives = space.primitives

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, cw: CellWeights) -> torch.Tensor:
        if fast_path_enabled():
            return self._forward_fast(s0, s1, cw)
        states = self.input_states(s0, s1)
        e = 0
        for j in self.nodes:
            total = None
            for i in range(j):
                edge = self.edges[edge_key(j, i)]
                for o in cw.active[e]:
                    out = cw.weights[e, o] * edge.ops[self.primitives[o]](states[i])
                    total = out if total is None else total + out
                e += 1
            states.append(total)
        return torch.cat(states[2:], dim=1)

    def _forward_fast(self, s0: torch.Tensor, s1: torch.Tensor, cw: CellWeights) -> torch.Tensor:
        """The same sum, cheaper: each op scales its own output inside its last BatchNorm, and the
        conv ops reading a state share one ReLU of it (computed only if one of them runs)."""
        states = self.input_states(s0, s1)
        relus: dict[int, torch.Tensor] = {}
        e = 0
        for j in self.nodes:
            total = None
            for i in range(j):
                ops = self.edges[edge_key(j, i)].ops
                for o in cw.active[e]:
                    op = ops[self.primitives[o]]
                    w = cw.scalar(e, o)
                    if isinstance(op, nn.Identity):
                        out = w * op(states[i])
                    elif isinstance(op, TAKES_RELU):
                        if i not in relus:
                            relus[i] = F.relu(states[i])
                        out = op(states[i], relu_x=relus[i], scale=w)
                    else:
                        out = op(states[i], scale=w)
                    total = out if total is None else total + out
                e += 1
            states.append(total)
        return CatChannels.apply(*states[2:])


class Supernet(nn.Module):
    """Stem, cells, head: network weights only. Architecture weights arrive as forward arguments."""

    def __init__(self, space: SpaceConfig):
        super().__init__()
        self.space = space
        self.stem, slots, c_out = cell_plan(space, space.supernet_norm)
        self.cells = nn.ModuleList(SearchCell(space, s.c_pp, s.c_p, s.c, s.reduction, s.reduction_prev) for s in slots)
        self.classifier = nn.Linear(c_out, space.num_classes)

    def forward(self, x: torch.Tensor, weights: dict[str, CellWeights]) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights["reduce" if cell.reduction else "normal"])
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))
