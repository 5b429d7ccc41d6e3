"""CPU kernels of the supernet's fast path (``space.fastpath``): cheaper routes to the same values.

Normalisation (batch-statistics BatchNorm, or GroupNorm) with a folded scale, depthwise convolutions
whose gradients run on oneDNN's fast kernels, a 3x3 average pool as a depthwise conv, a channel
concatenation that hands back dense gradients, and FactorizedReduce's two pixel phases as dense
copies. Each is exact in real arithmetic and equal up to summation order in float.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fastpath import fast_path_enabled


def scaled_norm(norm: nn.Module, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """A stateless normalisation without affine parameters (``ops.norm_layer``: BatchNorm on batch
    statistics, or one-group GroupNorm), optionally times a scalar ``scale``.

    Passing the scalar as the per-channel weight costs nothing and saves a separate multiply (and its
    backward) over the whole activation; the gradient w.r.t. ``scale`` is the same sum.
    """
    weight = None if scale is None else scale.to(x.dtype).expand(x.shape[1]).contiguous()  # kernels read it densely
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(x, norm.num_groups, weight, None, norm.eps)
    return F.batch_norm(x, None, None, weight, None, True, 0.0, norm.eps)


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
    parts = [
        _dw_weight_grad_direct(g, xp[..., b0 : b0 + s * (wo - 1) + b1 - b0], k, b1 - b0, (s, s), (0, 0), (1, 1))
        for b0, b1 in blocks
    ]
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
    up = torch.empty(
        (g.shape[0], c, (ho - 1) * s + 1 + rh, (wo - 1) * s + 1 + rw), dtype=g.dtype, device=g.device, memory_format=fmt
    )
    up.zero_()
    up[:, :, : (ho - 1) * s + 1 : s, : (wo - 1) * s + 1 : s] = g
    return F.conv2d(up, w.flip([2, 3]), None, 1, q, d, c)


class DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, s: int, p: int, d: int):
        ctx.save_for_backward(x, w)
        ctx.conf = (s, p, d)
        return F.conv2d(x, w, None, s, p, d, x.shape[1])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        s, p, d = ctx.conf
        g = (
            g.contiguous(memory_format=torch.channels_last)
            if x.is_contiguous(memory_format=torch.channels_last)
            else g.contiguous()
        )
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


def avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    key = (x.shape[-2], x.shape[-1], x.device, x.dtype)
    if key not in _INV_COUNT:
        ones = torch.ones(1, 1, x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)
        _INV_COUNT[key] = 1.0 / F.conv2d(ones, torch.ones(1, 1, 3, 3, dtype=x.dtype, device=x.device), None, 1, 1)
    return _AvgPool3x3.apply(x, _INV_COUNT[key])


def cat_channels(xs: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along channels; on the fast path with dense gradients for the inputs."""
    return CatChannels.apply(*xs) if fast_path_enabled() else torch.cat(xs, dim=1)


class CatChannels(torch.autograd.Function):
    """``torch.cat(xs, dim=1)`` whose backward hands each input a dense gradient in its own memory
    format. Autograd's default gives channel slices of the output gradient (neither NCHW- nor
    NHWC-dense; the classifier's pooling even returns NCHW), and every kernel downstream, BatchNorm
    and oneDNN convs alike, would then copy or take a slow path."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.formats = [
            torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            for x in xs
        ]
        ctx.sizes = [x.shape[1] for x in xs]
        return torch.cat(xs, dim=1)

    @staticmethod
    def backward(ctx, g):
        out, start = [], 0
        for size, fmt in zip(ctx.sizes, ctx.formats, strict=False):
            out.append(g.narrow(1, start, size).contiguous(memory_format=fmt))
            start += size
        return tuple(out)


class PixelPhases(torch.autograd.Function):
    """``x[..., ::2, ::2]`` and ``x[..., 1::2, 1::2]`` (zero-padded to the first's size where a size is
    odd) as dense copies in ``x``'s memory format: FactorizedReduce's two stride-2 1x1 convs become
    stride-1 convs of these, and the backward writes both gradients into one dense tensor.

    Why not the stride-2 convs: oneDNN 3.12's jit_1x1 (avx512_core) backward-weights kernel for a
    stride-2 1x1 conv corrupts the heap (free(): invalid size, SIGSEGV, SIGFPE) on channels_last input
    with fewer than 16 input channels, an odd batch and an even thread count (small clients' last
    batches). The stride-1 route is also faster: one dense input gradient, not two strided ones."""

    @staticmethod
    def forward(ctx, x):
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        ctx.shape, ctx.fmt = x.shape, fmt
        h, w = x.shape[-2:]
        even = x[:, :, ::2, ::2].clone(memory_format=fmt)  # a copy even where the slice is all of x (1x1)
        if h % 2 == 0 and w % 2 == 0:
            return even, x[:, :, 1::2, 1::2].clone(memory_format=fmt)
        odd = torch.zeros_like(even, memory_format=fmt)  # the reference reads zero padding past the edge
        odd[:, :, : h // 2, : w // 2] = x[:, :, 1::2, 1::2]
        return even, odd

    @staticmethod
    def backward(ctx, g_even, g_odd):
        h, w = ctx.shape[-2:]
        gx = torch.empty(ctx.shape, dtype=g_even.dtype, device=g_even.device, memory_format=ctx.fmt).zero_()
        gx[:, :, ::2, ::2] = g_even
        gx[:, :, 1::2, 1::2] = g_odd[:, :, : h // 2, : w // 2]
        return gx


def apply_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; depthwise square convs on CPU take the fast-gradient route when a gradient is due."""
    w = conv.weight
    if (
        fast_path_enabled()
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
        return DepthwiseConv.apply(x, w, conv.stride[0], conv.padding[0], conv.dilation[0])
    return conv(x)
