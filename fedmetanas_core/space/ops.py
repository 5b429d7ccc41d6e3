"""The candidate ops, built by name (``make_op``): DARTS's, and a full 3x3 convolution.

Normalisation keeps no running statistics and no affine parameters anywhere (no buffers: MAML and
federated averaging only ever see float parameters); which one is the space's ``norm``
(``norm_layer``). On the fast path (``space.fastpath``) each op takes two extra arguments: the ReLU
of its input when the cell has it already (``relu_x``), and the scalar mixing weight that its last
normalisation folds in (``scale``); on the reference path it computes the plain DARTS function.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..names import NORMS
from .fastpath import fast_path_enabled
from .kernels import CatChannels, PixelPhases, apply_conv, avg_pool_3x3, scaled_norm


def _scaled(out: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The reference path's mixing: the op's output times its weight (when one is given)."""
    return out if scale is None else scale * out


def norm_layer(norm: str, channels: int) -> nn.Module:
    """The space's normalisation, stateless and without affine parameters.

    ``batch``: BatchNorm on batch statistics, the DARTS search space's. ``group``: GroupNorm with one
    group, each image normalised over its own channels and pixels. A non-IID client's batches hold
    few classes, so batch statistics differ between its training and a balanced test set; per-image
    statistics do not depend on what else is in the batch.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels, affine=False, track_running_stats=False)
    if norm == "group":
        return nn.GroupNorm(1, channels, affine=False)
    raise ValueError(f"unknown norm {norm!r}; one of {', '.join(NORMS)}")


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, norm: str):
        super().__init__(
            nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), norm_layer(norm, c_out)
        )


class ConvOp(nn.Sequential):
    """A conv op: ReLU, convolutions, normalisation. On the fast path it takes the ReLU its cell
    shares and folds its mixing weight into the normalisation."""

    def forward(
        self, x: torch.Tensor, relu_x: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``relu_x``: ReLU(x) if the caller already has it; ``scale``: multiply the output by it."""
        if not fast_path_enabled():
            return _scaled(super().forward(x), scale)
        h = apply_conv(self[1], relu_x if relu_x is not None else F.relu(x))
        for layer in list(self)[2:-1]:
            h = layer(h)
        return scaled_norm(self[-1], h, scale)


class DilConv(ConvOp):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int, norm: str):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            norm_layer(norm, c_out),
        )


class FullConv(ConvOp):
    """The ``conv_3x3`` op: a full (not separable) convolution, as NAS-Bench-201's."""

    def __init__(self, c: int, stride: int, norm: str):
        super().__init__(nn.ReLU(inplace=False), nn.Conv2d(c, c, 3, stride, 1, bias=False), norm_layer(norm, c))


class SepConv(nn.Sequential):
    """Two stacked depthwise-separable convolutions, as in DARTS."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, norm: str):
        super().__init__(
            DilConv(c_in, c_in, kernel, stride, padding, 1, norm),
            DilConv(c_in, c_out, kernel, 1, padding, 1, norm),
        )

    def forward(
        self, x: torch.Tensor, relu_x: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not fast_path_enabled():
            return _scaled(super().forward(x), scale)
        return self[1](self[0](x, relu_x=relu_x), scale=scale)


class FactorizedReduce(nn.Module):
    """Halves the resolution without losing every other pixel: two offset stride-2 1x1 convs."""

    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = norm_layer(norm, c_out)

    def forward(
        self, x: torch.Tensor, relu_x: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not fast_path_enabled():
            x = self.relu(x)
            shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))  # odd sizes: keep both branches the same shape
            return _scaled(self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1)), scale)
        h = relu_x if relu_x is not None else F.relu(x)
        # a 1x1 stride-2 conv reads every other pixel: stride-1 convs of the two pixel phases compute
        # the same and keep off oneDNN's stride-2 1x1 backward kernel (heap corruption; kernels.PixelPhases)
        even, odd = PixelPhases.apply(h)
        both = CatChannels.apply(F.conv2d(even, self.conv_1.weight), F.conv2d(odd, self.conv_2.weight))
        return scaled_norm(self.bn, both, scale)


class Zero(nn.Module):
    """The ``none`` op. The supernet never executes it (its output is 0); it only takes weight mass."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class PoolBN(nn.Sequential):
    def __init__(self, kind: str, c: int, stride: int, norm: str):
        pool = nn.MaxPool2d(3, stride, 1) if kind == "max" else nn.AvgPool2d(3, stride, 1, count_include_pad=False)
        super().__init__(pool, norm_layer(norm, c))

    def forward(
        self, x: torch.Tensor, relu_x: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not fast_path_enabled():
            return _scaled(super().forward(x), scale)
        pool = self[0]
        if isinstance(pool, nn.AvgPool2d) and pool.stride == 1 and x.device.type == "cpu":
            pooled = avg_pool_3x3(x)  # same values (count_include_pad=False), faster kernels
        else:
            pooled = pool(x)
        return scaled_norm(self[1], pooled, scale)


# ops whose first step is ReLU(x): on the fast path a cell computes ReLU(state) once for all of them
TAKES_RELU = (ConvOp, SepConv, FactorizedReduce)


def make_op(name: str, c: int, stride: int, norm: str) -> nn.Module:
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return PoolBN("max", c, stride, norm)
    if name == "avg_pool_3x3":
        return PoolBN("avg", c, stride, norm)
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(c, c, norm)
    if name.startswith("sep_conv_"):
        k = int(name[-1])
        return SepConv(c, c, k, stride, k // 2, norm)
    if name == "conv_3x3":
        return FullConv(c, stride, norm)
    if name.startswith("dil_conv_"):
        k = int(name[-1])
        return DilConv(c, c, k, stride, k - 1, 2, norm)
    raise ValueError(f"unknown op {name!r}")
