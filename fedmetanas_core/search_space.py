"""DARTS cell search space: ops, cells, the weights-only supernet and the architecture logits apart.

Edges are named by key, ``"3<-1"`` = node 3 takes node 1 as input (nodes 0 and 1 are the cell's two
inputs), and ops by name, so a state-dict key says what it is and extracting the discrete network
is a key lookup. BatchNorm keeps no running statistics anywhere: the supernet has no buffers, so
MAML and federated averaging only ever see float parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .relaxation import relax


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, affine=False, track_running_stats=False)


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int):
        super().__init__(nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), _bn(c_out))


class DilConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            _bn(c_out),
        )


class SepConv(nn.Sequential):
    """Two stacked depthwise-separable convolutions, as in DARTS."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int):
        super().__init__(
            DilConv(c_in, c_in, kernel, stride, padding, 1),
            DilConv(c_in, c_out, kernel, 1, padding, 1),
        )


class FactorizedReduce(nn.Module):
    """Halves the resolution without losing every other pixel: two offset stride-2 1x1 convs."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = _bn(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))  # odd sizes: keep both branches the same shape
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class Zero(nn.Module):
    """The ``none`` op. The supernet never executes it (its output is 0); it only takes weight mass."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class PoolBN(nn.Sequential):
    def __init__(self, kind: str, c: int, stride: int):
        pool = nn.MaxPool2d(3, stride, 1) if kind == "max" else nn.AvgPool2d(3, stride, 1, count_include_pad=False)
        super().__init__(pool, _bn(c))


def make_op(name: str, c: int, stride: int) -> nn.Module:
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return PoolBN("max", c, stride)
    if name == "avg_pool_3x3":
        return PoolBN("avg", c, stride)
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(c, c)
    if name.startswith("sep_conv_"):
        k = int(name[-1])
        return SepConv(c, c, k, stride, k // 2)
    if name.startswith("dil_conv_"):
        k = int(name[-1])
        return DilConv(c, c, k, stride, k - 1, 2)
    raise ValueError(f"unknown op {name!r}")


# ---------------------------------------------------------------------------------------------
# Cell topology, shared by the supernet, the architecture logits and the genotype


def edge_key(dst: int, src: int) -> str:
    return f"{dst}<-{src}"


@dataclass(frozen=True)
class CellTopology:
    num_nodes: int

    @property
    def nodes(self) -> range:  # intermediate nodes; 0 and 1 are the cell inputs
        return range(2, self.num_nodes + 2)

    @property
    def edges(self) -> list[tuple[int, int]]:
        return [(j, i) for j in self.nodes for i in range(j)]

    def pairs(self, node: int) -> list[tuple[int, int]]:
        return list(combinations(range(node), 2))

    def pair_incidence(self, node: int) -> torch.Tensor:
        """[pairs, inputs] 0/1: pair (a, b) feeds inputs a and b."""
        pairs = self.pairs(node)
        inc = torch.zeros(len(pairs), node)
        for p, (a, b) in enumerate(pairs):
            inc[p, a] = inc[p, b] = 1.0
        return inc


@dataclass(frozen=True)
class SpaceConfig:
    num_classes: int
    in_channels: int = 3
    init_channels: int = 8
    num_cells: int = 3
    num_nodes: int = 3
    stem_multiplier: int = 3
    primitives: tuple[str, ...] = (
        "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
        "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
    )  # fmt: skip
    input_pruning: bool = True

    @property
    def topology(self) -> CellTopology:
        return CellTopology(self.num_nodes)

    def reduction_cells(self) -> set[int]:
        if self.num_cells < 3:
            return {self.num_cells - 1} if self.num_cells > 1 else set()
        return {self.num_cells // 3, 2 * self.num_cells // 3}

    def cell_types(self) -> list[str]:
        red = self.reduction_cells()
        return ["reduce" if i in red else "normal" for i in range(self.num_cells)]


# ---------------------------------------------------------------------------------------------
# Architecture logits: alphas (ops per edge) and betas (input pairs per node), kept apart


class Architecture(nn.Module):
    """``alpha.<type>`` [edges, ops]; ``beta.<type>-<node>`` [pairs]. Init 1e-3 * N(0, 1)."""

    def __init__(self, space: SpaceConfig):
        super().__init__()
        topo = space.topology
        self.alpha = nn.ParameterDict(
            {t: nn.Parameter(1e-3 * torch.randn(len(topo.edges), len(space.primitives))) for t in ("normal", "reduce")}
        )
        self.beta = nn.ParameterDict()
        if space.input_pruning:
            for t in ("normal", "reduce"):
                for j in topo.nodes:
                    self.beta[f"{t}-{j}"] = nn.Parameter(1e-3 * torch.randn(len(topo.pairs(j))))


def arch_param_name(kind: str, cell_type: str, node: int | None = None) -> str:
    """State-dict name of an architecture tensor, as the SearchModel exposes it."""
    return f"arch.alpha.{cell_type}" if kind == "alpha" else f"arch.beta.{cell_type}-{node}"


@dataclass
class CellWeights:
    """What one cell type's forward needs: the effective weight per (edge, op) and which to run."""

    weights: torch.Tensor  # [edges, ops]: pair coefficient x op weight
    active: list[list[int]]  # per edge, indices of ops that run


# ---------------------------------------------------------------------------------------------
# The weights-only supernet


class MixedEdge(nn.Module):
    def __init__(self, primitives: tuple[str, ...], c: int, stride: int):
        super().__init__()
        self.ops = nn.ModuleDict({p: make_op(p, c, stride) for p in primitives if p != "none"})
        self.index = {p: i for i, p in enumerate(primitives)}


class SearchCell(nn.Module):
    def __init__(self, space: SpaceConfig, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(c_pp, c) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0)
        topo = space.topology
        self.edge_list = topo.edges
        self.nodes = list(topo.nodes)
        self.edges = nn.ModuleDict(
            {edge_key(j, i): MixedEdge(space.primitives, c, 2 if reduction and i < 2 else 1) for j, i in topo.edges}
        )
        self.primitives = space.primitives

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, cw: CellWeights) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
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


class Supernet(nn.Module):
    """Stem, cells, head: network weights only. Architecture weights arrive as forward arguments."""

    def __init__(self, space: SpaceConfig):
        super().__init__()
        self.space = space
        c_cur = space.stem_multiplier * space.init_channels
        self.stem = nn.Sequential(nn.Conv2d(space.in_channels, c_cur, 3, padding=1, bias=False), _bn(c_cur))
        c_pp, c_p, c = c_cur, c_cur, space.init_channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        for cell_type in space.cell_types():
            reduction = cell_type == "reduce"
            if reduction:
                c *= 2
            self.cells.append(SearchCell(space, c_pp, c_p, c, reduction, reduction_prev))
            reduction_prev = reduction
            c_pp, c_p = c_p, space.num_nodes * c
        self.classifier = nn.Linear(c_p, space.num_classes)

    def forward(self, x: torch.Tensor, weights: dict[str, CellWeights]) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights["reduce" if cell.reduction else "normal"])
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


# ---------------------------------------------------------------------------------------------
# Supernet + architecture: the model that MAML adapts and the server averages


@dataclass
class RelaxSettings:
    tau: float = 1.0
    mode: str = "gumbel-soft"
    noise: bool = True
    threshold: float = 0.01
    argmax: bool = False  # evaluation: one-hot op and pair choice


class SearchModel(nn.Module):
    """``net.*`` are network weights, ``arch.*`` architecture logits; every split keys on the prefix."""

    def __init__(self, space: SpaceConfig):
        super().__init__()
        self.space = space
        self.net = Supernet(space)
        self.arch = Architecture(space)
        topo = space.topology
        self._incidence = {j: topo.pair_incidence(j) for j in topo.nodes}
        self._none = space.primitives.index("none") if "none" in space.primitives else -1

    def cell_weights(
        self,
        cell_type: str,
        settings: RelaxSettings,
        masks: dict[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> CellWeights:
        masks = masks or {}
        name = arch_param_name("alpha", cell_type)
        alpha = self.arch.alpha[cell_type]
        op_w = _relax_or_onehot(alpha, settings, masks.get(name), generator, exclude=self._none)
        if self.space.input_pruning:
            coeffs = []
            for j in self.space.topology.nodes:
                beta = self.arch.beta[f"{cell_type}-{j}"]
                pair_w = _relax_or_onehot(beta, settings, masks.get(arch_param_name("beta", cell_type, j)), generator)
                coeffs.append(pair_w @ self._incidence[j].to(pair_w.device))  # input i's share: sum of its pairs
            weights = torch.cat(coeffs)[:, None] * op_w
        else:
            weights = op_w
        return CellWeights(weights, self._active(weights.detach(), settings.threshold))

    def _active(self, weights: torch.Tensor, threshold: float) -> list[list[int]]:
        """Which (edge, op) entries run: one host transfer for the whole cell, never one per op."""
        keep = weights > threshold
        if self._none >= 0:
            keep[:, self._none] = False
        # a node must compute something: keep its strongest real op even if all fall under the threshold
        best = weights.clone()
        if self._none >= 0:
            best[:, self._none] = -1.0
        e = 0
        for j in self.space.topology.nodes:
            block = best[e : e + j]
            flat = int(block.argmax())
            keep[e + flat // block.shape[1], flat % block.shape[1]] = True
            e += j
        return [row.nonzero().flatten().tolist() for row in keep.cpu()]

    def all_weights(self, settings: RelaxSettings, masks=None, generator=None) -> dict[str, CellWeights]:
        return {t: self.cell_weights(t, settings, masks, generator) for t in ("normal", "reduce")}

    def forward(self, x, settings: RelaxSettings, masks=None, generator=None) -> torch.Tensor:
        return self.net(x, self.all_weights(settings, masks, generator))


def _relax_or_onehot(logits, settings: RelaxSettings, mask, generator, exclude: int = -1) -> torch.Tensor:
    """Relaxed weights, or at evaluation in argmax mode the one-hot choice (never ``none``)."""
    if settings.argmax:
        z = logits.detach().clone()
        if mask is not None:
            z = z.masked_fill(~mask, float("-inf"))
        if exclude >= 0:
            z[..., exclude] = float("-inf")
        return F.one_hot(z.argmax(-1), logits.shape[-1]).float()
    return relax(logits, settings.tau, settings.mode, mask, generator, noise=settings.noise)
