"""Kernel tricks for the CPU only: same math as the native ops, faster at the supernets'
small channel counts on oneDNN (measurements: benchmarks/README.md, "CPU kernels").

Every entry point checks ``enabled(t)``: tensors on the CPU, and the tricks not switched off
(``disabled()``, which tests and benchmarks use to run the device-agnostic path, the one
CUDA takes, on the CPU). Elsewhere the native kernels run.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F


_ENABLED = True


def enabled(t: torch.Tensor) -> bool:
    """Whether the CPU kernels apply to ``t``: on the CPU, not switched off, and not traced by
    ``torch.compile`` (which generates its own kernels, and would guard on their caches)."""
    return _ENABLED and t.device.type == "cpu" and not torch.compiler.is_compiling()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the device-agnostic path (CUDA's) on the CPU inside the block."""
    global _ENABLED
    before, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = before


# Up to this many channels, CPU convolutions of NCHW tensors run in channels-last (the value
# was chosen by an interleaved A/B of the PC-DARTS step: benchmarks/README.md, "CPU kernels").
SMALL_CHANNELS = 8


def small_nchw(x: torch.Tensor) -> bool:
    """oneDNN pads NCHW tensors of few channels to a 16-channel blocked layout and reorders
    both ways on every call; in channels-last it computes on them directly."""
    return enabled(x) and x.dim() == 4 and x.shape[1] <= SMALL_CHANNELS and x.is_contiguous()


def _ones(v) -> bool:
    return all(i == 1 for i in v) if isinstance(v, (tuple, list)) else v == 1


def _zeros(v) -> bool:
    return all(i == 0 for i in v) if isinstance(v, (tuple, list)) else v == 0


def grouped_pointwise(x: torch.Tensor, weight: torch.Tensor, stride, padding, groups: int) -> bool:
    """A grouped 1x1 convolution of a contiguous NCHW tensor on CPU: one batched matrix product
    is 1.6-7x faster than oneDNN's grouped convolution at the edge groups' sizes (forward and
    backward, E = 2-4 groups of 4-16 channels)."""
    return (groups > 1 and enabled(x) and x.dim() == 4 and weight.shape[-2:] == (1, 1)
            and _ones(stride) and _zeros(padding) and x.is_contiguous())


def _pointwise(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The grouped 1x1 convolution as ``weight_g @ x_g`` per group: (B, G*ci, H, W) -> (B, G*co, H, W)."""
    B, _, H, W = x.shape
    wg = weight.to(x.dtype).reshape(groups, weight.shape[0] // groups, weight.shape[1])  # (G, co, ci)
    return torch.matmul(wg, x.view(B, groups, -1, H * W)).view(B, -1, H, W)             # (B, G*co, H, W)


def pointwise_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, groups: int,
                        need_x: bool, need_w: bool) -> tuple:
    """Input and weight gradients of ``_pointwise``, in the gradient's dtype."""
    B, _, H, W = grad.shape
    g = grad.contiguous().view(B, groups, -1, H * W)                                 # (B, G, co, HW)
    grad_x = grad_w = None
    if need_x:
        wg = weight.to(g.dtype).reshape(groups, weight.shape[0] // groups, weight.shape[1])
        grad_x = torch.matmul(wg.transpose(1, 2), g).view(B, -1, H, W)              # (B, G*ci, H, W)
    if need_w:
        xg = x.to(g.dtype).view(B, groups, -1, H * W)                                # (B, G, ci, HW)
        grad_w = torch.matmul(g, xg.transpose(2, 3)).sum(0).reshape(weight.shape)    # (G*co, ci, 1, 1)
    return grad_x, grad_w


def _strided_pointwise(like: torch.Tensor, channels: int, weight: torch.Tensor, stride, padding) -> int:
    """The stride of a few-channel 1x1 convolution on CPU with stride > 1 and no padding (else 0).
    It runs as a stride-1 convolution of every stride-th pixel: the same sums, and it avoids
    oneDNN's channels-last weight gradient for such convolutions, which corrupts the heap on
    some x86 CPUs (seen on an AMD EPYC with 1-7 input channels)."""
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if (enabled(like) and channels <= SMALL_CHANNELS and weight.shape[-2:] == (1, 1) and sh == sw > 1
            and _zeros(padding)):
        return sh
    return 0


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv2d`` without bias, run in channels-last for few-channel NCHW inputs on CPU (the
    output is NCHW again), grouped 1x1 convolutions there as matrix products, few-channel
    strided 1x1 convolutions there on the subsampled input."""
    if x.dim() == 4 and (s := _strided_pointwise(x, x.shape[1], weight, stride, padding)):
        return conv2d(x[:, :, ::s, ::s], weight, 1, 0, 1, groups)
    if grouped_pointwise(x, weight, stride, padding, groups):
        return _pointwise(x, weight, groups)
    if small_nchw(x):
        return F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, None, stride, padding, dilation,
                        groups).contiguous()
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def conv2d_input(shape, weight: torch.Tensor, grad: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """The input gradient of ``conv2d``, in the same layouts and in the gradient's dtype (under
    autocast the forward ran in it; convolution kernels take one dtype)."""
    weight = weight.to(grad.dtype)
    if len(shape) == 4 and (s := _strided_pointwise(grad, shape[1], weight, stride, padding)):
        out = grad.new_zeros(shape)
        out[:, :, ::s, ::s] = conv2d_input((*shape[:2], *grad.shape[2:]), weight, grad, 1, 0, 1, groups)
        return out
    if grouped_pointwise(grad, weight, stride, padding, groups):
        return pointwise_backward(grad, None, weight, groups, True, False)[0]
    if small_nchw(grad):
        return torch.nn.grad.conv2d_input(shape, weight, grad.contiguous(memory_format=torch.channels_last),
                                          stride, padding, dilation, groups).contiguous()
    return torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)


def _window_counts(H: int, W: int, stride: int, like: torch.Tensor) -> torch.Tensor:
    """How many in-image pixels each 3x3 window (padding 1) covers: (1, 1, H', W')."""
    ones = torch.ones(1, 1, H, W, dtype=like.dtype, device=like.device)
    return F.avg_pool2d(ones, 3, stride, 1, count_include_pad=True) * 9.0


def avg3x3(x: torch.Tensor, stride: int, counts: dict) -> torch.Tensor:
    """``avg_pool2d(x, 3, stride, 1, count_include_pad=False)`` as a separable box sum divided
    by the window counts (cached in ``counts`` by size and dtype): faster than oneDNN's kernel
    on NCHW tensors, and it keeps only the counts for backward."""
    H, W = x.shape[-2:]
    key = (H, W, x.dtype)
    if key not in counts:
        counts[key] = _window_counts(H, W, 1, x)
    xp = F.pad(x, (1, 1, 1, 1))
    rows = xp[..., :-2] + xp[..., 1:-1] + xp[..., 2:]                 # (B, C, H+2, W): horizontal sums
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]   # (B, C, H, W): 3x3 sums
    out = box / counts[key]
    if stride > 1:
        out = out[..., ::stride, ::stride].contiguous()
    return out


def max3x3(x: torch.Tensor, stride: int) -> torch.Tensor:
    """3x3 max pooling (padding 1) as separable maxima of shifted views: the same values as
    ``max_pool2d``, 10x faster at the supernets' small channel counts on CPU."""
    xp = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(xp[..., :-2], xp[..., 1:-1]), xp[..., 2:])              # (B, C, H+2, W)
    out = torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])  # (B, C, H, W)
    return out[..., ::stride, ::stride].contiguous() if stride > 1 else out


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int, stride: int, padding: int,
                          dilation: int) -> torch.Tensor:
    """Weight gradient of a depthwise convolution as the correlation of each (sample, channel)
    plane of the input with that of the output gradient, one group per plane (no copies of
    NCHW inputs), summed over the batch: (C, 1, k, k)."""
    B, C = x.shape[:2]
    Ho, Wo = grad.shape[-2:]
    xs = x.reshape(1, B * C, *x.shape[2:])                                          # (1, B*C, H, W)
    g = grad.reshape(B * C, 1, Ho, Wo)                                               # (B*C, 1, Ho, Wo)
    # w[c, i, j] = sum_{b,h,w} xpad[b, c, h*stride + i*dilation, w*stride + j*dilation] * grad[b, c, h, w]
    corr = F.conv2d(xs, g, None, dilation, padding, stride, B * C)[..., :k, :k]      # (1, B*C, k, k)
    return corr.reshape(B, C, k, k).sum(0).unsqueeze(1)                              # (C, 1, k, k)
