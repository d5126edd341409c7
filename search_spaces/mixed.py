"""Mixed edges: the candidate ops of a supernet edge, weighted by the architecture.

``MixedEdge`` computes one edge. ``EdgeGroup`` computes all the edges leaving one node of a
cell together: they read the same input (in PC-DARTS, the same first C/K channels), so each
candidate op runs once for all E of them, as if it were one op with E times the channels:
depthwise convolutions over the input repeated E times with the edges' kernels
concatenated, pointwise convolutions grouped by edge, the batch norms as one norm over the
edges' channels with each edge's op weight as the affine weight. Per channel this is the
same arithmetic as edge by edge; a step launches about a third as many kernels, which at
the supernets' 4-64 channels cost more than their arithmetic. The DARTS space uses groups;
NAS-Bench-201 runs edge by edge (grouped, its channels-last blocks cost more in layout
copies than the groups saved: see benchmarks/README.md).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Active, CellWeights
from .fused_ops import AvgPool3x3, MaxPool3x3, conv, depthwise_conv, edge_conv1x1_norms, edge_norms
from .ops import DilConv, FactorizedReduce, SepConv, create_op, shifted_by_one


class EdgeInput:
    """An edge's input and what every edge reading it can share, each computed at most once:
    its ReLU (for the ops that start with one) and its pooled versions (pooling ops have no
    parameters, so ``max_pool_3x3`` of a node is the same on every edge leaving it)."""

    __slots__ = ("x", "_relu", "_pooled")

    def __init__(self, x: torch.Tensor):
        self.x, self._relu, self._pooled = x, None, {}

    @property
    def relu(self) -> torch.Tensor:
        if self._relu is None:
            self._relu = F.relu(self.x)
        return self._relu

    def pooled(self, pool: nn.Module) -> torch.Tensor:
        key = (type(pool), pool.stride)
        if key not in self._pooled:
            self._pooled[key] = pool(self.x)
        return self._pooled[key]


Weight = Union[torch.Tensor, float]


def takes_grad(w: Weight) -> bool:
    """An architecture weight the step differentiates (else a constant of this step)."""
    return isinstance(w, torch.Tensor) and w.requires_grad


def accumulate(acc: Optional[torch.Tensor], y: torch.Tensor, w: Weight) -> torch.Tensor:
    """``acc + w * y``: with a weight that takes no gradient, in one in-place kernel that
    saves nothing but ``w`` for backward."""
    if acc is None:
        return y * w
    if isinstance(w, float):
        return acc.add_(y, alpha=w)
    if not w.requires_grad:
        return acc.addcmul_(y, w)
    return acc + w * y


def as_weights(t: torch.Tensor) -> list:
    """``t``'s entries nested like ``t.tolist()``, as 0-dim views on its device: no host
    transfer (a weight that takes no gradient is still a tensor)."""
    return [as_weights(row) for row in t.unbind(0)] if t.dim() > 1 else list(t.unbind(0))


def unpack(cw: CellWeights) -> tuple[Sequence[Sequence[Weight]], Optional[Sequence[Sequence[Weight]]]]:
    """Per-edge op weights and per-node edge weights (``as_weights``)."""
    return as_weights(cw.ops), None if cw.edges is None else [as_weights(e) for e in cw.edges]


class PoolBN(nn.Sequential):
    """A pooling op followed by an affine-free batch norm, as pooling outputs are in the
    DARTS supernet."""


class MixedEdge(nn.Module):
    """All candidate ops on one edge; ``forward`` sums ``w[k] * op_k(x)`` over the active ops."""

    def __init__(self, C: int, stride: int, op_names: Sequence[str], pool_bn: bool = True):
        super().__init__()
        ops = []
        for name in op_names:
            op = create_op(name, C, stride, affine=False)
            if "pool" in name and pool_bn:  # as in DARTS: pooling outputs are batch-normalised
                op = PoolBN(op, nn.BatchNorm2d(C, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, inp: EdgeInput, w: Sequence[Weight], active: Sequence[int]) -> Optional[torch.Tensor]:
        out = None
        for k in active:
            op, wk = self.ops[k], w[k]
            if takes_grad(wk) and hasattr(op, "scaled"):  # the weight fused into the op's norm
                y = op.scaled(inp.x, inp.relu, wk)
                out = y if out is None else out + y
                continue
            if isinstance(op, PoolBN):
                y = op[1](inp.pooled(op[0]))
            elif isinstance(op, (AvgPool3x3, MaxPool3x3)):
                y = inp.pooled(op)            # NAS-Bench-201: no batch norm after pooling
            elif getattr(op, "pre_relu", False):
                y = op.forward_relu(inp.relu)
            else:
                y = op(inp.x)
            out = accumulate(out, y, wk)
        return out



# -- edges leaving one node, computed together -------------------------------------------
# ``fn(ops, inp, w)``: ``ops`` are E modules of one class, one per edge, all reading ``inp``;
# returns (B, E*C, H', W'), block e being ``w[e] * ops[e](inp.x)`` (``w`` (E,) or None: unweighted).
GroupFn = Callable[[Sequence[nn.Module], EdgeInput, Optional[torch.Tensor]], torch.Tensor]
_GROUPED: dict[type, GroupFn] = {}


def grouped(cls: type) -> Callable[[GroupFn], GroupFn]:
    """Register how E ops of class ``cls`` reading one input are computed together."""
    def deco(fn: GroupFn) -> GroupFn:
        _GROUPED[cls] = fn
        return fn

    return deco


def _cat_weights(modules: Sequence[nn.Module]) -> torch.Tensor:
    return torch.cat([m.weight for m in modules])


@grouped(DilConv)
def _dil_conv(ops: Sequence[DilConv], inp: EdgeInput, w: Optional[torch.Tensor]) -> torch.Tensor:
    dw = ops[0][1]
    u = depthwise_conv(inp.relu, _cat_weights([op[1] for op in ops]), dw.stride[0], dw.padding[0],
                       dw.dilation[0], repeat=len(ops))                             # (B, E*C, H', W')
    return edge_conv1x1_norms(u, _cat_weights([op[2] for op in ops]), [op[3] for op in ops], w, groups=len(ops))


@grouped(SepConv)
def _sep_conv(ops: Sequence[SepConv], inp: EdgeInput, w: Optional[torch.Tensor]) -> torch.Tensor:
    h = _dil_conv([op[0] for op in ops], inp, None)                                 # (B, E*C, H', W')
    dw = ops[0][1][1]
    u = depthwise_conv(F.relu(h), _cat_weights([op[1][1] for op in ops]), 1, dw.padding[0], dw.dilation[0])
    return edge_conv1x1_norms(u, _cat_weights([op[1][2] for op in ops]), [op[1][3] for op in ops], w, groups=len(ops))


@grouped(PoolBN)
def _pool_bn(ops: Sequence[PoolBN], inp: EdgeInput, w: Optional[torch.Tensor]) -> torch.Tensor:
    return edge_norms(inp.pooled(ops[0][0]), [op[1] for op in ops], w, repeat=len(ops))


@grouped(nn.Identity)
def _skip(ops: Sequence[nn.Identity], inp: EdgeInput, w: Optional[torch.Tensor]) -> torch.Tensor:
    x, E = inp.x, len(ops)
    if w is None:
        return torch.cat([x] * E, 1)
    return (x.unsqueeze(1) * w.to(x.dtype).reshape(1, E, 1, 1, 1)).flatten(1, 2)    # (B, E*C, H, W)


@grouped(FactorizedReduce)
def _factorized_reduce(ops: Sequence[FactorizedReduce], inp: EdgeInput, w: Optional[torch.Tensor]) -> torch.Tensor:
    r, E = inp.relu, len(ops)
    a = conv(r, _cat_weights([op.conv_1 for op in ops]), 2)                          # (B, E*C/2, H/2, W/2)
    b = conv(shifted_by_one(r), _cat_weights([op.conv_2 for op in ops]), 2)
    z = torch.stack([a.unflatten(1, (E, -1)), b.unflatten(1, (E, -1))], 2).flatten(1, 3)  # (B, E*C, H/2, W/2)
    return edge_norms(z, [op.bn for op in ops], w)


def _one_by_one(ops: Sequence[nn.Module], inp: EdgeInput, w: Optional[torch.Tensor]) -> torch.Tensor:
    """Ops without a grouped form, edge by edge."""
    outs = [op(inp.x) for op in ops]
    return torch.cat(outs if w is None else [y * w[e].to(y.dtype) for e, y in enumerate(outs)], 1)


class EdgeGroup:
    """The E edges leaving one node of a cell (``edges[s]`` the s-th, all reading ``inp``)."""

    def __init__(self, edges: Sequence[MixedEdge], inp: EdgeInput):
        self.edges, self.inp = edges, inp

    def forward(self, w: torch.Tensor, active: Sequence[Sequence[int]]) -> list[Optional[torch.Tensor]]:
        """Per edge, ``sum_k w[s, k] * op_k(x)`` over its active ops (None if it has none).

        w: (E, ops), active: per edge, the op indices to compute."""
        E = len(self.edges)
        C = self.inp.x.shape[1]
        total = None                                     # (B, E*C, H', W'): ops active on every edge
        own: list[Optional[torch.Tensor]] = [None] * E   # ops active on some edges only
        for k in sorted({k for row in active for k in row}):
            slots = [s for s in range(E) if k in active[s]]
            ops = [self.edges[s].ops[k] for s in slots]
            wk = w[:, k] if len(slots) == E else w[slots, k]
            y = _GROUPED.get(type(ops[0]), _one_by_one)(ops, self.inp, wk)
            if len(slots) == E:  # in place: no op output is kept for backward (autograd would object)
                total = y if total is None else total.add_(y)
                continue
            for s, part in zip(slots, y.split(C, 1)):  # split, not slices: its backward is one cat
                own[s] = part if own[s] is None else own[s] + part
        out = [None] * E if total is None else list(total.split(C, 1))
        for s in range(E):
            if own[s] is not None:
                out[s] = own[s] if out[s] is None else out[s] + own[s]
        return out


class PreparedCellWeights:
    """The architecture weights of one cell type as its cells consume them, prepared once per
    forward for all of them: per cell input j (a cell input or a node), the weights (E_j, ops)
    of the edges leaving it, in the order of the supernet's edge groups, each edge's op
    weights times its edge weight when there are edge weights; per node the edge weights as
    they are (PC-DARTS weights the channels that bypass the ops with them); per edge the ops
    to compute. ``order`` holds the edge indices group after group, ``sizes`` the group sizes."""

    def __init__(self, cw: CellWeights, none_index: Optional[int], order: torch.Tensor, sizes: Sequence[int]):
        w = cw.ops                                                                   # (edges, ops)
        if cw.edges is not None:
            w = w * torch.cat(list(cw.edges))[:, None]  # edges are numbered node by node, inputs in order
        self.by_input: list[torch.Tensor] = list(w.index_select(0, order).split(list(sizes)))
        self.betas: Optional[Sequence[Sequence[Weight]]] = (
            None if cw.edges is None else [as_weights(e) for e in cw.edges])
        self.active: Active = cw.resolve_active(none_index)
