"""Same-math, faster implementations of the ops the supernets spend their time in on CPU.

Measured on the project's 2-core CPU machines (torch 2.14, fp32, NCHW, batch 64), per call:

* ``avg_pool2d(3, 1, 1, count_include_pad=False)`` at 64x16x32x32: 12.8 ms forward+backward
  natively, 3.8 ms as a separable box sum divided by the window counts;
* ``max_pool2d(3, 1, 1)`` at 64x4x32x32: 3.2 ms forward natively, 0.13 ms as separable
  maxima (same values); the backward recomputes the native kernel's argmax, so the gradient
  routing (ties included) is the native one, and no int64 indices are kept;
* depthwise convolutions: the weight gradient of a dilated 5x5 kernel at 64x16x32x32 49 ms
  natively, 0.6 ms as a correlation of input and output gradient, one group per plane; the input
  gradient of a dilated 5x5 kernel at 64x4x32x32 3.1 ms natively, 0.5 ms as a forward
  convolution with the flipped kernel;
* ``w * batch_norm(z)`` as one batch-norm kernel each way (``w`` as the affine weight), keeping
  only z and the batch statistics for backward; for E edges at once (``edge_norms``), with
  one weight per edge.

Results agree with the native ops to float rounding (the same sums in another order). On
CUDA the native kernels are used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# Up to this many channels, CPU convolutions of NCHW tensors run in channels-last. With the
# edges leaving a node computed together (12-64 channels per convolution), an interleaved A/B
# of the PC-DARTS step measured 0 / 4 / 8 / 12 / 16: 2.57 / 2.52 / 2.48 / 2.56 s, and 16 was
# slower than 0 (2.81 vs 2.65 s).
SMALL_CHANNELS = 8


def _small_nchw(x: torch.Tensor) -> bool:
    """oneDNN pads NCHW tensors of few channels to a 16-channel blocked layout and reorders
    both ways on every call (PC-DARTS's 4-channel 32x32 convolutions took 0.55-0.75 ms each in
    a search step); in channels-last it computes on them directly."""
    return x.device.type == "cpu" and x.dim() == 4 and x.shape[1] <= SMALL_CHANNELS and x.is_contiguous()


def _ones(v) -> bool:
    return all(i == 1 for i in v) if isinstance(v, (tuple, list)) else v == 1


def _zeros(v) -> bool:
    return all(i == 0 for i in v) if isinstance(v, (tuple, list)) else v == 0


def _grouped_pointwise(x: torch.Tensor, weight: torch.Tensor, stride, padding, groups: int) -> bool:
    """A grouped 1x1 convolution of a contiguous NCHW tensor on CPU: one batched matrix product
    is 1.6-7x faster than oneDNN's grouped convolution at the edge groups' sizes (forward and
    backward, E = 2-4 groups of 4-16 channels)."""
    return (groups > 1 and x.device.type == "cpu" and x.dim() == 4 and weight.shape[-2:] == (1, 1)
            and _ones(stride) and _zeros(padding) and x.is_contiguous())


def _pointwise(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The grouped 1x1 convolution as ``weight_g @ x_g`` per group: (B, G*ci, H, W) -> (B, G*co, H, W)."""
    B, _, H, W = x.shape
    wg = weight.to(x.dtype).reshape(groups, weight.shape[0] // groups, weight.shape[1])  # (G, co, ci)
    return torch.matmul(wg, x.view(B, groups, -1, H * W)).view(B, -1, H, W)             # (B, G*co, H, W)


def _pointwise_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, groups: int,
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


def _strided_pointwise(device: torch.device, channels: int, weight: torch.Tensor, stride, padding) -> int:
    """The stride of a few-channel 1x1 convolution on CPU with stride > 1 and no padding (else 0).
    It runs as a stride-1 convolution of every stride-th pixel: the same sums, and it avoids
    oneDNN's channels-last weight gradient for such convolutions, which corrupts the heap on
    some x86 CPUs (seen on an AMD EPYC with 1-7 input channels)."""
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if (device.type == "cpu" and channels <= SMALL_CHANNELS and weight.shape[-2:] == (1, 1) and sh == sw > 1
            and _zeros(padding)):
        return sh
    return 0


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv2d`` without bias, run in channels-last for few-channel NCHW inputs on CPU (the
    output is NCHW again), grouped 1x1 convolutions there as matrix products, few-channel
    strided 1x1 convolutions there on the subsampled input."""
    if x.dim() == 4 and (s := _strided_pointwise(x.device, x.shape[1], weight, stride, padding)):
        return conv2d(x[:, :, ::s, ::s], weight, 1, 0, 1, groups)
    if _grouped_pointwise(x, weight, stride, padding, groups):
        return _pointwise(x, weight, groups)
    if _small_nchw(x):
        return F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, None, stride, padding, dilation,
                        groups).contiguous()
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def conv2d_input(shape, weight: torch.Tensor, grad: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """The input gradient of ``conv2d``, in the same layouts and in the gradient's dtype (under
    autocast the forward ran in it; convolution kernels take one dtype)."""
    weight = weight.to(grad.dtype)
    if len(shape) == 4 and (s := _strided_pointwise(grad.device, shape[1], weight, stride, padding)):
        out = grad.new_zeros(shape)
        out[:, :, ::s, ::s] = conv2d_input((*shape[:2], *grad.shape[2:]), weight, grad, 1, 0, 1, groups)
        return out
    if _grouped_pointwise(grad, weight, stride, padding, groups):
        return _pointwise_backward(grad, None, weight, groups, True, False)[0]
    if _small_nchw(grad):
        return torch.nn.grad.conv2d_input(shape, weight, grad.contiguous(memory_format=torch.channels_last),
                                          stride, padding, dilation, groups).contiguous()
    return torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)


def like_layout(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory format of ``weight`` (a supernet's input follows its parameters)."""
    return x.contiguous(memory_format=torch.channels_last if _channels_last(weight) else torch.contiguous_format)


def _window_counts(H: int, W: int, stride: int, like: torch.Tensor) -> torch.Tensor:
    """How many in-image pixels each 3x3 window (padding 1) covers: (1, 1, H', W')."""
    ones = torch.ones(1, 1, H, W, dtype=like.dtype, device=like.device)
    return F.avg_pool2d(ones, 3, stride, 1, count_include_pad=True) * 9.0


class AvgPool3x3(nn.Module):
    """``avg_pool2d(x, 3, stride, padding=1, count_include_pad=False)``."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride
        self._counts: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or _channels_last(x):  # the native kernel is fast there
            return F.avg_pool2d(x, 3, self.stride, 1, count_include_pad=False)
        H, W = x.shape[-2:]
        key = (H, W, x.dtype)
        if key not in self._counts:
            self._counts[key] = _window_counts(H, W, 1, x)
        xp = F.pad(x, (1, 1, 1, 1))
        rows = xp[..., :-2] + xp[..., 1:-1] + xp[..., 2:]                 # (B, C, H+2, W): horizontal sums
        box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]   # (B, C, H, W): 3x3 sums
        out = box / self._counts[key]
        if self.stride > 1:
            out = out[..., :: self.stride, :: self.stride].contiguous()
        return out


def _max3x3(x: torch.Tensor, stride: int) -> torch.Tensor:
    """3x3 max pooling (padding 1) as separable maxima of shifted views: the same values as
    ``max_pool2d``, 10x faster at the supernets' small channel counts on CPU."""
    xp = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(xp[..., :-2], xp[..., 1:-1]), xp[..., 2:])              # (B, C, H+2, W)
    out = torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])  # (B, C, H, W)
    return out[..., ::stride, ::stride].contiguous() if stride > 1 else out


class _MaxPool(torch.autograd.Function):
    """3x3 max pooling (padding 1) keeping only its input for backward, where the native
    kernel's argmax (its tie-breaking included) is recomputed in channels-last."""

    @staticmethod
    def forward(ctx, x, stride):
        ctx.save_for_backward(x)
        ctx.stride = stride
        return _max3x3(x, stride)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = ctx.stride
        xl = x.contiguous(memory_format=torch.channels_last)
        _, idx = torch.ops.aten.max_pool2d_with_indices(xl, [3, 3], [s, s], [1, 1])
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(memory_format=torch.channels_last), xl, [3, 3], [s, s], [1, 1], [1, 1], False, idx)
        return grad_x.contiguous(), None


class MaxPool3x3(nn.Module):
    """``max_pool2d(x, 3, stride, padding=1)``; on CPU as separable maxima, keeping only its
    input for backward."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or _channels_last(x):
            return F.max_pool2d(x, 3, self.stride, 1)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxPool.apply(x, self.stride)
        return _max3x3(x, self.stride)


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


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise convolution with faster CPU gradients: the input gradient of a stride-1
    convolution as the forward convolution of the output gradient with the flipped kernel,
    the weight gradient as ``depthwise_weight_grad``. Keeps its input only when the weight
    takes a gradient. With ``repeat`` > 1, the convolution of ``x`` repeated that often along
    the channels (E edges reading the same input), keeping ``x`` once."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, repeat=1):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        xr = _repeat(x, repeat)
        ctx.conf = (xr.shape, stride, padding, dilation, repeat)
        return conv2d(xr, weight, stride, padding, dilation, xr.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        shape, stride, padding, dilation, repeat = ctx.conf
        w = weight.to(grad.dtype)  # under autocast the forward ran in the gradient's dtype
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if stride == 1:
                grad_x = conv2d(grad, w.flip(-1, -2), 1, padding, dilation, shape[1])
            else:
                grad_x = conv2d_input(shape, w, grad, stride, padding, dilation, shape[1])
            grad_x = _fold(grad_x, repeat)
        if ctx.needs_input_grad[1]:
            xr = _repeat(x.to(grad.dtype), repeat)
            grad_w = depthwise_weight_grad(xr, grad, weight.shape[-1], stride, padding, dilation)
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None, None, None


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int,
                   repeat: int = 1) -> torch.Tensor:
    """A bias-free depthwise convolution of ``x`` repeated ``repeat`` times along the channels
    (``weight``: (repeat*C, 1, k, k)); on CPU with ``_DepthwiseConv``'s gradients."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _DepthwiseConv.apply(x, weight, stride, padding, dilation, repeat)
    return F.conv2d(_repeat(x, repeat), weight, None, stride, padding, dilation, weight.shape[0])


class DepthwiseConv2d(nn.Conv2d):
    """A bias-free depthwise ``nn.Conv2d`` (same parameters and state dict) with the faster
    gradients of ``_DepthwiseConv`` on CPU."""

    def __init__(self, C: int, kernel: int, stride: int, padding: int, dilation: int):
        super().__init__(C, C, kernel, stride=stride, padding=padding, dilation=dilation, groups=C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _DepthwiseConv.apply(x, self.weight, self.stride[0], self.padding[0], self.dilation[0], 1)
        return super().forward(x)


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


def _layout(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(t) else torch.contiguous_format


def channel_weight(w: torch.Tensor, C: int) -> torch.Tensor:
    """A per-channel weight (C,) from ``w``: a scalar for every channel, or (E,) with entry e
    for the e-th block of C/E consecutive channels (E edges computed as one tensor)."""
    w = w.reshape(-1, 1)                                                               # (E, 1)
    # contiguous: with E = 1 the reshape is a stride-0 view, which the CPU norm kernels misread
    return w.expand(w.shape[0], C // w.shape[0]).reshape(C).contiguous()               # (C,)


def _repeat(z: torch.Tensor, times: int) -> torch.Tensor:
    """``z`` repeated ``times`` along the channels, in its memory format."""
    return z if times == 1 else torch.cat([z] * times, 1)


def _fold(grad: torch.Tensor, times: int) -> torch.Tensor:
    """The gradient of ``z`` from that of ``_repeat(z, times)``: the sum over the repeats."""
    return grad if times == 1 else grad.unflatten(1, (times, grad.shape[1] // times)).sum(1)


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
        grad.contiguous(memory_format=_layout(z)), z, weight, None, None, mean, invstd, True, eps,
        [need_z, need_w, False])
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
        y, *stats = _weighted_norm(_repeat(z, repeat), w, running_mean, running_var, momentum, eps)
        ctx.save_for_backward(z, *stats)
        ctx.eps, ctx.w_shape, ctx.repeat = eps, None if w is None else w.shape, repeat
        return y

    @staticmethod
    def backward(ctx, grad):
        z, *stats = ctx.saved_tensors
        grad_z, grad_w = _weighted_norm_backward(grad, _repeat(z, ctx.repeat), *stats, ctx.eps, ctx.w_shape,
                                                 *ctx.needs_input_grad[:2])
        return None if grad_z is None else _fold(grad_z, ctx.repeat), grad_w, None, None, None, None, None


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
            grad.contiguous(memory_format=_layout(z)), z, weight, None, None, mean, invstd, True, ctx.eps,
            [True, False, False])[0]
        del z
        if _grouped_pointwise(u, w, stride, padding, groups):
            grad_u, grad_w = _pointwise_backward(grad_z, u, w, groups, *ctx.needs_input_grad[:2])
            return (None if grad_u is None else grad_u.to(u_dtype), None if grad_w is None else
                    grad_w.to(conv_weight.dtype), None, None, None, None, None, None)
        small = _small_nchw(u)
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
            and u.device.type == "cpu" and _fusable(bn)):
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
        zr = _repeat(z, repeat)
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
    if (weight.requires_grad and not (w is not None and w.requires_grad) and u.device.type == "cpu"
            and torch.is_grad_enabled() and bns[0].training and bns[0].track_running_stats):
        running_mean, running_var, momentum, eps = _edge_stats(bns)
        y = _Conv1x1BatchNorm.apply(u, weight, running_mean, running_var, momentum, eps,
                                    ((1, 1), (0, 0), (1, 1), groups), w)
        _store_stats(bns, running_mean, running_var)
        return y
    return edge_norms(conv(u, weight, groups=groups), bns, w)
