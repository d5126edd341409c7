"""Fused autograd Functions that keep less for backward, on every device: the supernets'
``w * batch_norm(...)`` as one batch-norm kernel each way, convolutions whose weight takes
no gradient keeping no input, the norms of E edges computed as one tensor, 1x1 convolution
+ norm recomputing the convolution in backward, depthwise convolutions of one input for E
edges keeping that input once, max pooling without indices, average pooling keeping nothing.

Under autocast each backward casts what it saved to the gradient's dtype, so every
convolution and matrix product gets tensors of one dtype (cuDNN refuses mixed ones). The
CPU-only tricks they call (``cpu_kernels``) fall back to the native kernels elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .cpu_kernels import (avg3x3, conv2d, conv2d_input, depthwise_weight_grad, grouped_pointwise, max3x3,
                          pointwise_backward, small_nchw)
from .layout import fold_channels, is_channels_last, memory_format_of, repeat_channels


class _ConvInputGradOnly(torch.autograd.Function):
    """A convolution whose weight needs no gradient: saves the weight and the input's shape,
    not the input (the input gradient does not need it)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return conv2d(x, weight, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        grad_x = conv2d_input(shape, weight, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that, when its weight takes no gradient
    (the architecture step), keeps no copy of its input for backward, and runs few-channel
    NCHW inputs on CPU in channels-last (see ``conv2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and self.padding_mode == "zeros":
            return conv(x, self.weight, self.stride, self.padding, self.dilation, self.groups)
        return super().forward(x)


def conv(x: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """A bias-free convolution as ``Conv2d`` runs it: keeping no input when the weight takes no
    gradient, few-channel NCHW inputs on CPU in channels-last."""
    if not weight.requires_grad and x.requires_grad and torch.is_grad_enabled():
        return _ConvInputGradOnly.apply(x, weight, stride, padding, dilation, groups)
    return conv2d(x, weight, stride, padding, dilation, groups)


def _fusable(bn: nn.BatchNorm2d) -> bool:
    """The norms the fused kernels below replace: affine-free, in training, tracking statistics."""
    return bn.training and bn.affine is False and bn.track_running_stats and torch.is_grad_enabled()


def _takes_grad(w) -> bool:
    return isinstance(w, torch.Tensor) and w.requires_grad and w.numel() == 1


def _norm_args(bn: nn.BatchNorm2d) -> tuple:
    """Count the batch as ``bn`` would and return its (running_mean, running_var, momentum, eps)."""
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return bn.running_mean, bn.running_var, momentum, bn.eps


def channel_weight(w: torch.Tensor, C: int) -> torch.Tensor:
    """A per-channel weight (C,) from ``w``: a scalar for every channel, or (E,) with entry e
    for the e-th block of C/E consecutive channels (E edges computed as one tensor)."""
    w = w.reshape(-1, 1)                                                               # (E, 1)
    # contiguous: with E = 1 the reshape is a stride-0 view, which the CPU norm kernels misread
    return w.expand(w.shape[0], C // w.shape[0]).reshape(C).contiguous()               # (C,)


def _weighted_norm(z, w, running_mean, running_var, momentum, eps):
    """``w * batch_norm(z)`` as one kernel, ``w`` as the affine weight (``channel_weight``):
    (output, weight, mean, invstd), the last three for ``_weighted_norm_backward``."""
    weight = None if w is None else channel_weight(w, z.shape[1])                    # (C,)
    y, mean, invstd = torch.native_batch_norm(z, weight, None, running_mean, running_var, True, momentum, eps)
    return y, weight, mean, invstd


def _weighted_norm_backward(grad, z, weight, mean, invstd, eps, w_shape, need_z: bool, need_w: bool):
    """One batch-norm backward kernel: the gradient of z, and that of ``w`` as the sums of the
    per-channel weight gradients over each entry's channels."""
    grad_z, grad_weight, _ = torch.ops.aten.native_batch_norm_backward(
        grad.contiguous(memory_format=memory_format_of(z)), z, weight, None, None, mean, invstd, True, eps,
        [need_z, need_w, False])
    # by the flags, not by None: traced under torch.compile the kernel's outputs are never None
    grad_z = grad_z if need_z else None
    if not need_w:
        return grad_z, None
    E = max(1, w_shape.numel())
    return grad_z, grad_weight.view(E, -1).sum(1).reshape(w_shape)


class _ScaledBatchNorm(torch.autograd.Function):
    """``w * batch_norm(z)`` (training mode, no affine) as one batch-norm kernel each way
    (``_weighted_norm``): saves z and the batch statistics, not the normalized output. With
    ``repeat`` > 1, the norm of ``z`` repeated that often along the channels (E edges reading
    the same input), keeping ``z`` once."""

    @staticmethod
    def forward(ctx, z, w, running_mean, running_var, momentum, eps, repeat=1):
        y, *stats = _weighted_norm(repeat_channels(z, repeat), w, running_mean, running_var, momentum, eps)
        ctx.save_for_backward(z, *stats)
        ctx.eps, ctx.w_shape, ctx.repeat = eps, None if w is None else w.shape, repeat
        return y

    @staticmethod
    def backward(ctx, grad):
        z, *stats = ctx.saved_tensors
        need_z, need_w = ctx.needs_input_grad[:2]
        grad_z, grad_w = _weighted_norm_backward(grad, repeat_channels(z, ctx.repeat), *stats, ctx.eps, ctx.w_shape,
                                                 need_z, need_w)
        return fold_channels(grad_z, ctx.repeat) if need_z else None, grad_w, None, None, None, None, None


class _ScaledConvBatchNorm(torch.autograd.Function):
    """``w * batch_norm(conv(r))`` for a convolution whose weight takes no gradient (the
    architecture step): keeps only ``r`` (which the ReLU before it keeps anyway) and the
    batch statistics, and recomputes the convolution output in backward."""

    @staticmethod
    def forward(ctx, r, conv_weight, w, running_mean, running_var, momentum, eps, conf):
        conv_weight = conv_weight.to(r.dtype)  # under autocast r arrives in the autocast dtype
        y, *stats = _weighted_norm(conv2d(r, conv_weight, *conf), w, running_mean, running_var, momentum, eps)
        ctx.save_for_backward(r, conv_weight, *stats)
        ctx.eps, ctx.w_shape, ctx.conf = eps, w.shape, conf
        return y

    @staticmethod
    def backward(ctx, grad):
        r, conv_weight, *stats = ctx.saved_tensors
        need_r, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        z = conv2d(r, conv_weight, *ctx.conf)
        grad_z, grad_w = _weighted_norm_backward(grad, z, *stats, ctx.eps, ctx.w_shape, need_r, need_w)
        del z
        grad_r = conv2d_input(r.shape, conv_weight, grad_z, *ctx.conf) if need_r else None
        return grad_r, None, grad_w, None, None, None, None, None


class _Conv1x1BatchNorm(torch.autograd.Function):
    """``batch_norm(conv1x1(u))`` (training mode, no affine) keeping ``u`` (which the weight
    gradient needs anyway) and the batch statistics, not the convolution's output: backward
    recomputes it (a 1x1 convolution is cheap). ``scale``, a tensor taking no gradient (a
    plain op weight, ``channel_weight``), multiplies the output as the norm's affine weight."""

    @staticmethod
    def forward(ctx, u, conv_weight, running_mean, running_var, momentum, eps, conf, scale=None):
        z = conv2d(u, conv_weight.to(u.dtype), *conf)
        weight = None if scale is None else channel_weight(scale, z.shape[1])
        y, mean, invstd = torch.native_batch_norm(z, weight, None, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(u, conv_weight, weight, mean, invstd)
        ctx.eps, ctx.conf, ctx.dtype = eps, conf, z.dtype  # under autocast z's dtype may not be u's
        return y

    @staticmethod
    def backward(ctx, grad):
        u, conv_weight, weight, mean, invstd = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        u_dtype, u = u.dtype, u.to(ctx.dtype)
        w = conv_weight.to(ctx.dtype)
        z = conv2d(u, w, *ctx.conf)
        grad_z = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(memory_format=memory_format_of(z)), z, weight, None, None, mean, invstd, True, ctx.eps,
            [True, False, False])[0]
        del z
        if grouped_pointwise(u, w, stride, padding, groups):
            grad_u, grad_w = pointwise_backward(grad_z, u, w, groups, *ctx.needs_input_grad[:2])
            return (None if grad_u is None else grad_u.to(u_dtype), None if grad_w is None else
                    grad_w.to(conv_weight.dtype), None, None, None, None, None, None)
        small = small_nchw(u)
        if small:  # the convolution ran in channels-last: so does its backward
            cl = torch.channels_last
            u, grad_z = u.contiguous(memory_format=cl), grad_z.contiguous(memory_format=cl)
        grad_u, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_z, u, w, None, stride, padding, dilation, False, [0, 0], groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        if grad_u is not None:
            grad_u = (grad_u.contiguous() if small else grad_u).to(u_dtype)
        return grad_u, None if grad_w is None else grad_w.to(conv_weight.dtype), None, None, None, None, None, None


def _conv_conf(conv: nn.Conv2d) -> tuple:
    return conv.stride, conv.padding, conv.dilation, conv.groups


def scaled_batch_norm(z: torch.Tensor, bn: nn.BatchNorm2d, w) -> torch.Tensor:
    """``w * bn(z)`` for an affine-free ``bn``; in training with a ``w`` that takes gradients,
    in one kernel each way, without keeping ``bn(z)`` for backward."""
    if not (_fusable(bn) and _takes_grad(w)):
        return bn(z) * w
    return _ScaledBatchNorm.apply(z, w, *_norm_args(bn))


def scaled_conv_batch_norm(r: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, w) -> torch.Tensor:
    """``w * bn(conv(r))``; when the convolution's weight takes no gradient and ``w`` does,
    keeping neither the convolution's output nor the norm's (see ``_ScaledConvBatchNorm``)."""
    if conv.weight.requires_grad or conv.bias is not None or not (_fusable(bn) and _takes_grad(w)):
        return scaled_batch_norm(conv(r), bn, w)
    return _ScaledConvBatchNorm.apply(r, conv.weight, w, *_norm_args(bn), _conv_conf(conv))


def conv_batch_norm(u: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(u))``; for a bias-free 1x1 convolution whose weight takes a gradient and an
    affine-free ``bn`` in training (the supernet's weight step), without keeping the
    convolution's output for backward (see ``_Conv1x1BatchNorm``)."""
    if not (conv.kernel_size == (1, 1) and conv.bias is None and conv.weight.requires_grad
            and _fusable(bn)):
        return bn(conv(u))
    return _Conv1x1BatchNorm.apply(u, conv.weight, *_norm_args(bn), _conv_conf(conv))


# -- the norms of E edges computed as one tensor ------------------------------------------
def _edge_stats(bns) -> tuple:
    """The running statistics of E affine-free norms, concatenated, with (momentum, eps); in
    training counts the batch as each norm would. ``_store_stats`` writes them back."""
    bn = bns[0]
    if not bn.track_running_stats:
        return None, None, 0.0, bn.eps
    momentum = 0.0
    if bn.training:
        torch._foreach_add_([b.num_batches_tracked for b in bns], 1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return torch.cat([b.running_mean for b in bns]), torch.cat([b.running_var for b in bns]), momentum, bn.eps


def _store_stats(bns, running_mean, running_var) -> None:
    if running_mean is None or not bns[0].training:
        return
    C = bns[0].num_features
    torch._foreach_copy_([bn.running_mean for bn in bns] + [bn.running_var for bn in bns],
                         list(running_mean.split(C)) + list(running_var.split(C)))


def edge_norms(z: torch.Tensor, bns, w=None, repeat: int = 1) -> torch.Tensor:
    """``cat_e(w[e] * bns[e](z_e))`` over E affine-free norms ``bns``, z_e the e-th block of
    ``repeat(z)``'s channels (``z`` repeated ``repeat`` times along the channels, for edges
    that read the same input); ``w`` (E,) or None. One batch-norm kernel each way; in
    training, keeps only ``z`` and the batch statistics."""
    running_mean, running_var, momentum, eps = _edge_stats(bns)
    training = bns[0].training or not bns[0].track_running_stats
    grad = torch.is_grad_enabled() and (z.requires_grad or (w is not None and w.requires_grad))
    if training and grad:
        y = _ScaledBatchNorm.apply(z, w, running_mean, running_var, momentum, eps, repeat)
    else:
        zr = repeat_channels(z, repeat)
        weight = None if w is None else channel_weight(w, zr.shape[1])
        y = F.batch_norm(zr, running_mean, running_var, weight, None, training, momentum, eps)
    _store_stats(bns, running_mean, running_var)
    return y


def edge_conv1x1_norms(u: torch.Tensor, weight: torch.Tensor, bns, w=None, groups: int = 1) -> torch.Tensor:
    """``edge_norms(conv1x1(u))`` for E edges' 1x1 convolutions, ``weight`` their weights
    concatenated (with ``groups`` = E each reads its own block of u's channels). In the
    weight step (the convolution's weight takes a gradient and keeps ``u`` anyway, ``w``
    takes none) the convolution's output is recomputed in backward rather than kept
    (``_Conv1x1BatchNorm``)."""
    if (weight.requires_grad and not (w is not None and w.requires_grad)
            and torch.is_grad_enabled() and bns[0].training and bns[0].track_running_stats):
        running_mean, running_var, momentum, eps = _edge_stats(bns)
        y = _Conv1x1BatchNorm.apply(u, weight, running_mean, running_var, momentum, eps,
                                    ((1, 1), (0, 0), (1, 1), groups), w)
        _store_stats(bns, running_mean, running_var)
        return y
    return edge_norms(conv(u, weight, groups=groups), bns, w)


# -- pooling and depthwise convolutions that keep less for backward -----------------------
class _AvgPool(torch.autograd.Function):
    """3x3 average pooling (padding 1, padded pixels not counted) keeping nothing for
    backward but its input's shape (the native op keeps the input itself)."""

    @staticmethod
    def forward(ctx, x, stride):
        ctx.conf = (x.shape, memory_format_of(x), stride)
        return F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)

    @staticmethod
    def backward(ctx, grad):
        shape, fmt, s = ctx.conf
        like = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)   # shape only
        return torch.ops.aten.avg_pool2d_backward(grad, like, [3, 3], [s, s], [1, 1], False, False, None), None


class AvgPool3x3(nn.Module):
    """``avg_pool2d(x, 3, stride, padding=1, count_include_pad=False)`` keeping nothing but
    shapes for backward; on the CPU (NCHW) as ``cpu_kernels.avg3x3``."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride
        self._counts: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.enabled(x) and not is_channels_last(x):
            return avg3x3(x, self.stride, self._counts)
        if torch.is_grad_enabled() and x.requires_grad:
            return _AvgPool.apply(x, self.stride)
        return F.avg_pool2d(x, 3, self.stride, 1, count_include_pad=False)


class _MaxPool(torch.autograd.Function):
    """3x3 max pooling (padding 1) keeping only its input for backward (the native op also
    keeps int64 indices of its output's size), where the argmax is recomputed by the native
    kernel (its tie-breaking included). On the CPU the forward runs as separable maxima and
    the backward in channels-last (``cpu_kernels``)."""

    @staticmethod
    def forward(ctx, x, stride):
        ctx.save_for_backward(x)
        ctx.stride = stride
        return max3x3(x, stride) if cpu_kernels.enabled(x) else F.max_pool2d(x, 3, stride, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = ctx.stride
        fmt = torch.channels_last if cpu_kernels.enabled(x) else memory_format_of(x)
        xl = x.contiguous(memory_format=fmt)
        _, idx = torch.ops.aten.max_pool2d_with_indices(xl, [3, 3], [s, s], [1, 1])
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(memory_format=fmt), xl, [3, 3], [s, s], [1, 1], [1, 1], False, idx)
        return grad_x.contiguous(memory_format=memory_format_of(x)), None


class MaxPool3x3(nn.Module):
    """``max_pool2d(x, 3, stride, padding=1)`` keeping only its input for backward."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad and not (cpu_kernels.enabled(x) and is_channels_last(x)):
            return _MaxPool.apply(x, self.stride)
        if cpu_kernels.enabled(x) and not is_channels_last(x):
            return max3x3(x, self.stride)
        return F.max_pool2d(x, 3, self.stride, 1)


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise convolution of ``x`` repeated ``repeat`` times along the channels (E edges
    reading the same input, each with its own kernels), keeping ``x`` once, not the repeated
    copy the native convolution would keep, and only when the weight takes a gradient. On the
    CPU its gradients take ``cpu_kernels``' faster forms: the input gradient of a stride-1
    convolution as the forward convolution of the output gradient with the flipped kernel,
    the weight gradient as ``depthwise_weight_grad``."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, repeat=1):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        xr = repeat_channels(x, repeat)
        ctx.conf = (xr.shape, stride, padding, dilation, repeat)
        return conv2d(xr, weight, stride, padding, dilation, xr.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        shape, stride, padding, dilation, repeat = ctx.conf
        need_x, need_w = ctx.needs_input_grad[:2]
        w = weight.to(grad.dtype)  # under autocast the forward ran in the gradient's dtype
        cpu = cpu_kernels.enabled(grad)
        grad_x = grad_w = None
        if need_x:
            if cpu and stride == 1:
                grad_x = conv2d(grad, w.flip(-1, -2), 1, padding, dilation, shape[1])
            else:
                grad_x = conv2d_input(shape, w, grad, stride, padding, dilation, shape[1])
            grad_x = fold_channels(grad_x, repeat)
        if need_w:
            xr = repeat_channels(x.to(grad.dtype), repeat)
            if cpu:
                grad_w = depthwise_weight_grad(xr, grad, weight.shape[-1], stride, padding, dilation)
            else:
                grad_w = torch.ops.aten.convolution_backward(
                    grad, xr, w, None, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], shape[1],
                    [False, True, False])[1]
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None, None, None


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int,
                   repeat: int = 1) -> torch.Tensor:
    """A bias-free depthwise convolution of ``x`` repeated ``repeat`` times along the channels
    (``weight``: (repeat*C, 1, k, k)), through ``_DepthwiseConv`` when it takes gradients."""
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and (repeat > 1 or cpu_kernels.enabled(x))):
        return _DepthwiseConv.apply(x, weight, stride, padding, dilation, repeat)
    return F.conv2d(repeat_channels(x, repeat), weight, None, stride, padding, dilation, weight.shape[0])


class DepthwiseConv2d(nn.Conv2d):
    """A bias-free depthwise ``nn.Conv2d`` (same parameters and state dict), with the faster
    gradients of ``_DepthwiseConv`` on the CPU."""

    def __init__(self, C: int, kernel: int, stride: int, padding: int, dilation: int):
        super().__init__(C, C, kernel, stride=stride, padding=padding, dilation=dilation, groups=C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv(x, self.weight, self.stride[0], self.padding[0], self.dilation[0])
