"""DARTS cell search space: ops, cells, the weights-only supernet and the architecture logits apart.

Edges are named by key, ``"3<-1"`` = node 3 takes node 1 as input (nodes 0 and 1 are the cell's two
inputs), and ops by name, so a state-dict key says what it is and extracting the discrete network
is a key lookup. BatchNorm keeps no running statistics anywhere: the supernet has no buffers, so
MAML and federated averaging only ever see float parameters.

Speed (docs/speed.md, ``python -m benchmarks.speed``): by default forward passes take a fast path
that computes the same function with the same parameters, generator draws and active ops (equal
within float rounding; tests/test_speed_paths.py) on fewer, cheaper kernels: channels_last
activations on CPU, depthwise-conv gradients and the 3x3 average pool on oneDNN's fast depthwise
kernels, dense gradients out of every channel concatenation, the mixing weight folded into each op's
last BatchNorm, and one ReLU per cell state shared by all conv ops that read it.
``set_fast_path(False)`` / ``with fast_path(False):`` selects the plain eager reference path (the
straightforward DARTS code), e.g. to compare the two or to trace the modules.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .relaxation import relax


# ---------------------------------------------------------------------------------------------
# Fast path switches


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


def _batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-statistics BatchNorm (no affine, no running stats), optionally times a scalar ``scale``.

    Passing the scalar as BatchNorm's per-channel weight costs nothing and saves a separate multiply
    (and its backward) over the whole activation; the gradient w.r.t. ``scale`` is the same sum.
    """
    weight = None if scale is None else scale.to(x.dtype).expand(x.shape[1]).contiguous()  # kernels read it densely
    return F.batch_norm(x, None, None, weight, None, True, 0.0, bn.eps)


# Depthwise convolutions on CPU. oneDNN's forward kernels are fast for every kernel size, dilation and
# stride, but its backward kernels are only fast for depthwise 3x3 (or narrower) undilated kernels; the
# DARTS 5x5 and dilated convs fall back to generic kernels that are 5-30x slower than the forward. The
# gradients are rewritten in terms of the fast kernels: the input gradient is a forward conv of the
# output gradient with the flipped kernel (zero-stuffed for stride 2); the weight gradient splits the
# kernel into column blocks <= 3 wide and removes dilation by a polyphase (space-to-batch) split.
# Exact in real arithmetic; in float, equal up to summation order. Differentiable (second-order MAML).


def _dw_weight_grad_direct(g, x, kh: int, kw: int, stride, padding, dilation) -> torch.Tensor:
    c = x.shape[1]
    shape_only = x.new_empty(()).expand(c, 1, kh, kw)
    return torch.ops.aten.convolution_backward(
        g, x, shape_only, None, list(stride), list(padding), list(dilation), False, [0, 0], c, [False, True, False]
    )[1]


def _dw_weight_grad(g: torch.Tensor, x: torch.Tensor, k: int, s: int, p: int, d: int) -> torch.Tensor:
    ho, wo = g.shape[-2:]
    if d == 1 and k <= 3:
        return _dw_weight_grad_direct(g, x, k, k, (s, s), (p, p), (1, 1))
    if d == 1 and s == 1 and k == 2 * p + 1:
        # centre three columns straight from the padding argument; each outer column on a shifted copy
        cols = {}
        for b in range(k):
            if abs(b - p) > 1:
                shift = b - p  # column b reads x[..., w + shift]
                cols[b] = _dw_weight_grad_direct(g, F.pad(x, (-shift, shift)), k, 1, (1, 1), (p, 0), (1, 1))
        centre = _dw_weight_grad_direct(g, x, k, 3, (1, 1), (p, 1), (1, 1))
        return torch.cat([cols[b] for b in range(p - 1)] + [centre] + [cols[b] for b in range(p + 2, k)], dim=3)
    xp = F.pad(x, (p, p, p, p))
    if d > 1:
        if s == d:  # taps and strides on the same lattice: one subsampled copy
            xp = xp[:, :, ::d, ::d]
        elif s == 1 and ho % d == 0 and wo % d == 0:  # polyphase: d*d phases stacked along the batch
            hh, ww = ho // d + k - 1, wo // d + k - 1
            xp = torch.cat([xp[:, :, r::d, q::d][:, :, :hh, :ww] for r in range(d) for q in range(d)])
            g = torch.cat([g[:, :, r::d, q::d] for r in range(d) for q in range(d)])
        else:
            return _dw_weight_grad_direct(g, x, k, k, (s, s), (p, p), (d, d))
        s = 1
    ho, wo = g.shape[-2:]
    xp = xp[:, :, : s * (ho - 1) + k]
    blocks = [(b0, min(b0 + 3, k)) for b0 in range(0, k, 3)]
    parts = [_dw_weight_grad_direct(g, xp[..., b0 : b0 + s * (wo - 1) + b1 - b0], k, b1 - b0, (s, s), (0, 0), (1, 1)) for b0, b1 in blocks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)


def _dw_input_grad(g: torch.Tensor, w: torch.Tensor, in_hw, s: int, p: int, d: int) -> torch.Tensor:
    c, k = w.shape[0], w.shape[-1]
    q = d * (k - 1) - p
    if s == 1:
        return F.conv2d(g, w.flip([2, 3]), None, 1, q, d, c)
    ho, wo = g.shape[-2:]
    rh = in_hw[0] - ((ho - 1) * s + 1 + d * (k - 1) - 2 * p)
    rw = in_hw[1] - ((wo - 1) * s + 1 + d * (k - 1) - 2 * p)
    if d == 1:  # oneDNN's transposed depthwise conv is fast without dilation
        return F.conv_transpose2d(g, w, None, s, p, (rh, rw), c, 1)
    fmt = torch.channels_last if g.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    up = torch.empty((g.shape[0], c, (ho - 1) * s + 1 + rh, (wo - 1) * s + 1 + rw), dtype=g.dtype, device=g.device, memory_format=fmt)
    up.zero_()
    up[:, :, : (ho - 1) * s + 1 : s, : (wo - 1) * s + 1 : s] = g
    return F.conv2d(up, w.flip([2, 3]), None, 1, q, d, c)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, s: int, p: int, d: int):
        ctx.save_for_backward(x, w)
        ctx.conf = (s, p, d)
        return F.conv2d(x, w, None, s, p, d, x.shape[1])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        s, p, d = ctx.conf
        g = g.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) else g.contiguous()
        gx = _dw_input_grad(g, w, x.shape[-2:], s, p, d) if ctx.needs_input_grad[0] else None
        gw = _dw_weight_grad(g, x, w.shape[-1], s, p, d) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None


class _AvgPool3x3(torch.autograd.Function):
    """3x3 stride-1 average pool without padded pixels: a depthwise all-ones conv times 1/count.

    oneDNN's depthwise 3x3 kernels are 2-3x faster than the native pooling kernels, both ways."""

    @staticmethod
    def forward(ctx, x, inv_count):
        ctx.save_for_backward(inv_count)
        c = x.shape[1]
        return F.conv2d(x, x.new_ones(c, 1, 3, 3), None, 1, 1, 1, c).mul_(inv_count)

    @staticmethod
    def backward(ctx, g):
        (inv_count,) = ctx.saved_tensors
        c = g.shape[1]
        return F.conv2d(g * inv_count, g.new_ones(c, 1, 3, 3), None, 1, 1, 1, c), None


_INV_COUNT: dict[tuple, torch.Tensor] = {}


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    key = (x.shape[-2], x.shape[-1], x.device, x.dtype)
    if key not in _INV_COUNT:
        ones = torch.ones(1, 1, x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)
        _INV_COUNT[key] = 1.0 / F.conv2d(ones, torch.ones(1, 1, 3, 3, dtype=x.dtype, device=x.device), None, 1, 1)
    return _AvgPool3x3.apply(x, _INV_COUNT[key])


def cat_channels(xs: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along channels; on the fast path with dense gradients for the inputs."""
    return _CatChannels.apply(*xs) if _FAST else torch.cat(xs, dim=1)


class _CatChannels(torch.autograd.Function):
    """``torch.cat(xs, dim=1)`` whose backward hands each input a dense gradient in its own memory
    format. Autograd's default gives channel slices of the output gradient (neither NCHW- nor
    NHWC-dense; the classifier's pooling even returns NCHW), and every kernel downstream, BatchNorm
    and oneDNN convs alike, would then copy or take a slow path."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.formats = [torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format for x in xs]
        ctx.sizes = [x.shape[1] for x in xs]
        return torch.cat(xs, dim=1)

    @staticmethod
    def backward(ctx, g):
        out, start = [], 0
        for size, fmt in zip(ctx.sizes, ctx.formats):
            out.append(g.narrow(1, start, size).contiguous(memory_format=fmt))
            start += size
        return tuple(out)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; depthwise square convs on CPU take the fast-gradient route when a gradient is due."""
    w = conv.weight
    if (
        _FAST
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and (x.requires_grad or w.requires_grad)
        and conv.bias is None
        and conv.padding_mode == "zeros"
        and conv.groups == conv.in_channels == conv.out_channels
        and w.shape[-1] == w.shape[-2]
        and isinstance(conv.padding, tuple)  # not "same"/"valid"
        and conv.stride[0] == conv.stride[1]
        and conv.padding[0] == conv.padding[1]
        and conv.dilation[0] == conv.dilation[1]
    ):
        return _DepthwiseConv.apply(x, w, conv.stride[0], conv.padding[0], conv.dilation[0])
    return conv(x)


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

    def forward(self, x: torch.Tensor, relu_x: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``relu_x``: ReLU(x) if the caller already has it; ``scale``: multiply the output by it."""
        if not _FAST:
            out = super().forward(x)
            return out if scale is None else scale * out
        h = relu_x if relu_x is not None else F.relu(x)
        return _batch_norm(self[3], self[2](_conv(self[1], h)), scale)


class SepConv(nn.Sequential):
    """Two stacked depthwise-separable convolutions, as in DARTS."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int):
        super().__init__(
            DilConv(c_in, c_in, kernel, stride, padding, 1),
            DilConv(c_in, c_out, kernel, 1, padding, 1),
        )

    def forward(self, x: torch.Tensor, relu_x: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        if not _FAST:
            out = super().forward(x)
            return out if scale is None else scale * out
        return self[1](self[0](x, relu_x=relu_x), scale=scale)


class FactorizedReduce(nn.Module):
    """Halves the resolution without losing every other pixel: two offset stride-2 1x1 convs."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = _bn(c_out)

    def forward(self, x: torch.Tensor, relu_x: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        if not _FAST:
            x = self.relu(x)
            shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))  # odd sizes: keep both branches the same shape
            out = self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))
            return out if scale is None else scale * out
        h = relu_x if relu_x is not None else F.relu(x)
        if h.shape[-2] % 2 == 0 and h.shape[-1] % 2 == 0:
            # a 1x1 stride-2 conv reads every other pixel: with even sizes the padded row/column of
            # the shifted branch is never read, so read the odd pixels directly (a quarter-size copy)
            odd = F.conv2d(h[:, :, 1::2, 1::2], self.conv_2.weight)
        else:
            odd = self.conv_2(F.pad(h[:, :, 1:, 1:], (0, 1, 0, 1)))
        return _batch_norm(self.bn, _CatChannels.apply(self.conv_1(h), odd), scale)


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

    def forward(self, x: torch.Tensor, relu_x: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        if not _FAST:
            out = super().forward(x)
            return out if scale is None else scale * out
        pool = self[0]
        if isinstance(pool, nn.AvgPool2d) and pool.stride == 1 and x.device.type == "cpu":
            pooled = _avg_pool_3x3(x)  # same values (count_include_pad=False), faster kernels
        else:
            pooled = pool(x)
        return _batch_norm(self[1], pooled, scale)


# ops whose first step is ReLU(x): on the fast path a cell computes ReLU(state) once for all of them
_TAKES_RELU = (DilConv, SepConv, FactorizedReduce)


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
    _scalars: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)

    def scalar(self, e: int, o: int) -> torch.Tensor:
        """``weights[e, o]``; one unbind per forward (shared by the cells of a type), not a select per op."""
        if self._scalars is None:
            self._scalars = self.weights.reshape(-1).unbind()
        return self._scalars[e * self.weights.shape[1] + o]


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
        if _FAST:
            return self._forward_fast(s0, s1, cw)
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

    def _forward_fast(self, s0: torch.Tensor, s1: torch.Tensor, cw: CellWeights) -> torch.Tensor:
        """The same sum, cheaper: each op scales its own output inside its last BatchNorm, and the
        conv ops reading a state share one ReLU of it (computed only if one of them runs)."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
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
                    elif isinstance(op, _TAKES_RELU):
                        if i not in relus:
                            relus[i] = F.relu(states[i])
                        out = op(states[i], relu_x=relus[i], scale=w)
                    else:
                        out = op(states[i], scale=w)
                    total = out if total is None else total + out
                e += 1
            states.append(total)
        return _CatChannels.apply(*states[2:])


@dataclass(frozen=True)
class CellSlot:
    """One cell's place in the network: its type and channel counts (shared by supernet and derived net)."""

    cell_type: str
    c_pp: int
    c_p: int
    c: int
    reduction: bool
    reduction_prev: bool


def cell_plan(space: SpaceConfig) -> tuple[nn.Sequential, list[CellSlot], int]:
    """The stem, each cell's slot (channels double at reduction cells), and the head's input width."""
    c_cur = space.stem_multiplier * space.init_channels
    stem = nn.Sequential(nn.Conv2d(space.in_channels, c_cur, 3, padding=1, bias=False), _bn(c_cur))
    c_pp, c_p, c = c_cur, c_cur, space.init_channels
    slots, reduction_prev = [], False
    for cell_type in space.cell_types():
        reduction = cell_type == "reduce"
        c = 2 * c if reduction else c
        slots.append(CellSlot(cell_type, c_pp, c_p, c, reduction, reduction_prev))
        reduction_prev = reduction
        c_pp, c_p = c_p, space.num_nodes * c
    return stem, slots, c_p


class Supernet(nn.Module):
    """Stem, cells, head: network weights only. Architecture weights arrive as forward arguments."""

    def __init__(self, space: SpaceConfig):
        super().__init__()
        self.space = space
        self.stem, slots, c_out = cell_plan(space)
        self.cells = nn.ModuleList(
            SearchCell(space, s.c_pp, s.c_p, s.c, s.reduction, s.reduction_prev) for s in slots
        )
        self.classifier = nn.Linear(c_out, space.num_classes)

    def forward(self, x: torch.Tensor, weights: dict[str, CellWeights]) -> torch.Tensor:
        s0 = s1 = self.stem(to_fast_layout(x))
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
        self._incidence_on: dict[tuple[int, torch.device], torch.Tensor] = {}  # per-device copies, made once
        self._none = space.primitives.index("none") if "none" in space.primitives else -1

    def _pair_incidence(self, j: int, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self._incidence[j]
        key = (j, device)
        if key not in self._incidence_on:
            self._incidence_on[key] = self._incidence[j].to(device)
        return self._incidence_on[key]

    def cell_weights(
        self,
        cell_type: str,
        settings: RelaxSettings,
        masks: dict[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> CellWeights:
        weights = self._effective_weights(cell_type, settings, masks, generator)
        return CellWeights(weights, self._active(weights.detach(), settings.threshold))

    def _effective_weights(self, cell_type: str, settings: RelaxSettings, masks, generator) -> torch.Tensor:
        masks = masks or {}
        name = arch_param_name("alpha", cell_type)
        alpha = self.arch.alpha[cell_type]
        op_w = _relax_or_onehot(alpha, settings, masks.get(name), generator, exclude=self._none)
        if self.space.input_pruning:
            coeffs = []
            for j in self.space.topology.nodes:
                beta = self.arch.beta[f"{cell_type}-{j}"]
                pair_w = _relax_or_onehot(beta, settings, masks.get(arch_param_name("beta", cell_type, j)), generator)
                coeffs.append(pair_w @ self._pair_incidence(j, pair_w.device))  # input i's share: sum of its pairs
            return torch.cat(coeffs)[:, None] * op_w
        return op_w

    def _active(self, weights: torch.Tensor, threshold: float) -> list[list[int]]:
        """Which (edge, op) entries run: one host transfer for the whole cell, never one per op."""
        return [row.nonzero().flatten().tolist() for row in self._keep(weights, threshold).cpu()]

    def _keep(self, weights: torch.Tensor, threshold: float) -> torch.Tensor:
        keep = weights > threshold
        if self._none >= 0:
            keep[:, self._none] = False
        # a node must compute something: keep its strongest real op even if all fall under the threshold
        best = weights.clone()
        if self._none >= 0:
            best[:, self._none] = -1.0
        e = 0
        for j in self.space.topology.nodes:  # on the device: no host sync per node
            block = best[e : e + j]
            keep[e : e + j] |= F.one_hot(block.flatten().argmax(), block.numel()).view(block.shape).bool()
            e += j
        return keep

    def all_weights(self, settings: RelaxSettings, masks=None, generator=None) -> dict[str, CellWeights]:
        if not _FAST:
            return {t: self.cell_weights(t, settings, masks, generator) for t in ("normal", "reduce")}
        # same draws in the same order; both cell types' active sets in one host transfer
        weights = {t: self._effective_weights(t, settings, masks, generator) for t in ("normal", "reduce")}
        keep = torch.stack([self._keep(w.detach(), settings.threshold) for w in weights.values()]).cpu()
        return {t: CellWeights(w, [row.nonzero().flatten().tolist() for row in k]) for (t, w), k in zip(weights.items(), keep)}

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
