"""What a supernet's forward consumes: per cell type, the weight of every op on every edge
(and, with edge normalization, of every edge into a node), plus which ops to compute.

The architecture optimizer owns the parameterization (simplex weights as they are for GAEA,
softmax for DARTS, one-hot samples for GDAS and random search) and builds these; the
supernet only multiplies and sums.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

Active = tuple[tuple[int, ...], ...]


@dataclass
class CellWeights:
    ops: torch.Tensor                                  # (edges, n_ops)
    edges: Optional[Sequence[torch.Tensor]] = None     # per node: (inputs of that node,)
    active: Optional[Active] = None                    # per edge: op indices to compute
    dense: bool = False  # the optimizer guarantees no exact zeros: skip the check (and its host sync)

    def resolve_active(self, none_index: Optional[int]) -> Active:
        """Op indices to compute per edge: ``active`` when given (a sampled architecture),
        every op when ``dense``, otherwise every op whose weight is not exactly zero; never
        the ``none`` op, whose output is zero whatever its weight."""
        if self.active is not None:
            return tuple(tuple(k for k in row if k != none_index) for row in self.active)
        if self.dense:
            return all_ops_active(self.ops.shape[0], self.ops.shape[1], none_index)
        nonzero = (self.ops.detach() != 0).tolist()  # one host transfer for the whole cell type
        return tuple(tuple(k for k, nz in enumerate(row) if nz and k != none_index) for row in nonzero)


@functools.lru_cache(maxsize=64)
def all_ops_active(n_edges: int, n_ops: int, none_index: Optional[int]) -> Active:
    row = tuple(k for k in range(n_ops) if k != none_index)
    return (row,) * n_edges


def one_hot_active(indices: Sequence[int]) -> Active:
    return tuple((int(k),) for k in indices)
