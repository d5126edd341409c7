"""The op table shared by both search spaces, keyed by the benchmarks' own op names.

Every factory has the signature ``(C, stride, affine) -> nn.Module`` and maps a tensor of
shape (B, C, H, W) to (B, C, H/stride, W/stride).

Definitions follow the DARTS paper (ReLU-Conv-BN order, separable convolutions applied twice,
factorized reduce for a stride-2 skip) and NAS-Bench-201 (``nor_conv_*`` = ReLU-Conv-BN).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fused_ops import AvgPool3x3, Conv2d, DepthwiseConv2d, MaxPool3x3, conv_batch_norm, scaled_batch_norm, scaled_conv_batch_norm

OpFactory = Callable[[int, int, bool], nn.Module]

_OPS: dict[str, OpFactory] = {}

# The op lists of the two benchmark spaces, in the benchmarks' own order.
DARTS_OPS: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
NB201_OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")


def register_op(name: str) -> Callable[[OpFactory], OpFactory]:
    def deco(fn: OpFactory) -> OpFactory:
        if name in _OPS:
            raise ValueError(f"op {name!r} is already registered")
        _OPS[name] = fn
        return fn

    return deco


def op_names() -> tuple[str, ...]:
    return tuple(_OPS)


def check_op(name: str) -> None:
    if name not in _OPS:
        raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(_OPS)}")


def create_op(name: str, C: int, stride: int, affine: bool = True) -> nn.Module:
    """Build op ``name`` for ``C`` channels; raises ValueError listing the valid names."""
    check_op(name)
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    return _OPS[name](C, stride, affine)


# Ops that begin with a ReLU set ``pre_relu`` and offer ``forward_relu(relu(x))``, so a
# supernet computes ``relu(x)`` once per input and shares it among all the ops that read it.
# ``scaled(x, relu_x, w)``, where offered, computes ``w * op(x)`` with the weight fused into the
# op's final norm (NAS-Bench-201's per-edge path; the DARTS space computes its edges in groups,
# see ``mixed.py``).


class ReLUConvBN(nn.Sequential):
    pre_relu = True

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            Conv2d(C_in, C_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_relu(self[0](x))

    def forward_relu(self, r: torch.Tensor) -> torch.Tensor:
        return conv_batch_norm(r, self[1], self[2])

    def scaled(self, x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``w * self(x)`` given ``r = relu(x)``. A 1x1 convolution's output is recomputed in
        the architecture step's backward rather than kept (cheap); a larger kernel's is kept
        (recomputing NAS-Bench-201's 3x3 outputs saved 0.13 GB per step but cost 10% of its time)."""
        if self[1].kernel_size != (1, 1):
            return scaled_batch_norm(self[1](r), self[2], w)
        return scaled_conv_batch_norm(r, self[1], self[2], w)


class DilConv(nn.Sequential):
    """ReLU, depthwise (possibly dilated) conv, pointwise conv, BN."""

    pre_relu = True

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel, stride, padding, dilation),
            Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_relu(self[0](x))

    def forward_relu(self, r: torch.Tensor) -> torch.Tensor:
        return conv_batch_norm(self[1](r), self[2], self[3])


class SepConv(nn.Sequential):
    """The DARTS separable convolution: the ReLU-dw-pw-BN block applied twice."""

    pre_relu = True

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            DilConv(C_in, C_in, kernel, stride, padding, 1, affine),
            DilConv(C_in, C_out, kernel, 1, padding, 1, affine),
        )

    def forward_relu(self, r: torch.Tensor) -> torch.Tensor:
        return self[1](self[0].forward_relu(r))


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset stride-2 1x1 convs whose outputs are concatenated."""

    pre_relu = True

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_relu(self.relu(x))

    def forward_relu(self, r: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.conv_1(r), self.conv_2(shifted_by_one(r))], dim=1))


def shifted_by_one(r: torch.Tensor) -> torch.Tensor:
    """``r`` shifted by one pixel down and right, the second half's input in a factorized
    reduce (odd sizes padded so both halves agree in shape)."""
    if r.shape[2] % 2 or r.shape[3] % 2:
        return F.pad(r, (0, 1, 0, 1))[:, :, 1:, 1:]
    return r[:, :, 1:, 1:]


class Zero(nn.Module):
    """The ``none`` op. Supernets never call it (its contribution is skipped); discrete
    networks whose genotype names it get zeros of the right shape."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


register_op("none")(lambda C, stride, affine: Zero(stride))
register_op("max_pool_3x3")(lambda C, stride, affine: MaxPool3x3(stride))
register_op("avg_pool_3x3")(lambda C, stride, affine: AvgPool3x3(stride))  # count_include_pad=False
register_op("skip_connect")(
    lambda C, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine))
register_op("sep_conv_3x3")(lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine))
register_op("sep_conv_5x5")(lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine))
register_op("dil_conv_3x3")(lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine))
register_op("dil_conv_5x5")(lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine))
register_op("nor_conv_1x1")(lambda C, stride, affine: ReLUConvBN(C, C, 1, stride, 0, affine))
register_op("nor_conv_3x3")(lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, affine))
