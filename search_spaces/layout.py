"""Memory formats and channel repeats shared by the supernets' kernels (any device)."""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def like_layout(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory format of ``weight`` (a supernet's input follows its parameters)."""
    return x.contiguous(memory_format=torch.channels_last if is_channels_last(weight) else torch.contiguous_format)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def repeat_channels(z: torch.Tensor, times: int) -> torch.Tensor:
    """``z`` repeated ``times`` along the channels, in its memory format."""
    return z if times == 1 else torch.cat([z] * times, 1)


def fold_channels(grad: torch.Tensor, times: int) -> torch.Tensor:
    """The gradient of ``z`` from that of ``repeat_channels(z, times)``: the sum over the repeats."""
    return grad if times == 1 else grad.unflatten(1, (times, grad.shape[1] // times)).sum(1)
