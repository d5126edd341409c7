"""What a search step asks of the device, measured without running it: aten calls (each a
kernel launch on a GPU), the dtypes each convolution and matrix product receives, and the
bytes autograd keeps for backward.

Run the step on the ``meta`` device (shapes only, no data: any host read raises) for the
device-agnostic path, the one CUDA takes; on the CPU for the CPU path.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose kernels (cuDNN, cuBLAS) take one dtype for all their floating inputs
ONE_DTYPE_OPS = {"convolution", "convolution_backward", "_convolution", "cudnn_convolution", "mm", "bmm", "addmm",
                 "baddbmm", "addbmm", "matmul", "linear", "_scaled_mm"}


def _floating_dtypes(args: Iterable) -> set[torch.dtype]:
    out = set()
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            out.add(a.dtype)
        elif isinstance(a, (list, tuple)):
            out |= _floating_dtypes(a)
    return out


class StepAudit(TorchDispatchMode):
    """Counts aten calls by op and records every convolution or matrix product that gets
    floating tensors of more than one dtype (``mixed``: (op, dtypes) pairs)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.mixed: list[tuple[str, tuple[str, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.calls[name] += 1
        if name in ONE_DTYPE_OPS:
            dtypes = _floating_dtypes(list(args) + list(kwargs.values()))
            if len(dtypes) > 1:
                self.mixed.append((name, tuple(sorted(str(d) for d in dtypes))))
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the ``with`` block, each
    storage counted once; storages of ``exclude`` (the parameters) left out.

    Storages are told apart by address, so every counted one is held until the block ends:
    a storage freed by one backward would otherwise hand its address to the next pass's
    tensors, which would go uncounted (a bilevel step runs several passes)."""

    def __init__(self, exclude: Optional[Iterable[torch.Tensor]] = None):
        self.exclude = {t.untyped_storage()._cdata for t in (exclude or [])}
        self.seen: set[int] = set()
        self._held: list = []
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.seen and key not in self.exclude:
            self.seen.add(key)
            self._held.append(storage)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._held.clear()
