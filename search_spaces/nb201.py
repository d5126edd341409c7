"""NAS-Bench-201: the weight-sharing supernet (6 edges x 5 ops) and the discrete network of
an arch string. Skeleton: stem, three stages of N cells (C, 2C, 4C) joined by residual
reduction blocks, BN-ReLU, global pooling, linear classifier."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arch import CellWeights
from .mixed import EdgeInput, MixedEdge, Weight, unpack
from .layout import like_layout
from .genotypes import NB201Genotype, derive_nb201
from .ops import NB201_OPS, ReLUConvBN, create_op

N_NODES = 4                 # input node + 3
N_EDGES = 6                 # 1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2
EDGE_INPUTS = tuple((i, j) for i in range(1, N_NODES) for j in range(i))


class ResNetBlock(nn.Module):
    """NAS-Bench-201's residual reduction block between stages."""

    def __init__(self, C_in: int, C_out: int, stride: int = 2):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, stride, 1)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1)
        if stride == 2:
            self.downsample = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(C_in, C_out, 1, bias=False))
        elif C_in != C_out:
            self.downsample = ReLUConvBN(C_in, C_out, 1, 1, 0)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.conv_b(self.conv_a(x)) + residual


def _skeleton(C: int, N: int, make_cell) -> tuple[nn.Module, nn.ModuleList, int]:
    """Stem, then three stages of N cells (C, 2C, 4C channels) joined by residual reductions."""
    stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
    layers = nn.ModuleList()
    C_prev = C
    for stage, C_curr in enumerate((C, 2 * C, 4 * C)):
        if stage > 0:
            layers.append(ResNetBlock(C_prev, C_curr, 2))
        layers.extend(make_cell(C_curr) for _ in range(N))
        C_prev = C_curr
    return stem, layers, C_prev


class NB201SearchCell(nn.Module):
    def __init__(self, C: int, op_names: Sequence[str]):
        super().__init__()
        # NAS-Bench-201 does not batch-normalise pooling outputs
        self.edges = nn.ModuleList(MixedEdge(C, 1, op_names, pool_bn=False) for _ in range(N_EDGES))

    def forward(self, x: torch.Tensor, op_w: Sequence[Sequence[Weight]],
                active: Sequence[Sequence[int]], rest: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """``rest[i-1]``: a 0-d tensor added to node i (see ``NB201Supernet.forward``)."""
        nodes = [x]
        inputs = [EdgeInput(x)]
        e = 0
        for i in range(1, N_NODES):
            s = None
            for j in range(i):
                y = self.edges[e](inputs[j], op_w[e], active[e])
                if y is not None:
                    s = y if s is None else s + y
                e += 1
            s = torch.zeros_like(x) if s is None else s
            nodes.append(s if rest is None else s + rest[i - 1])
            inputs.append(EdgeInput(nodes[-1]))
        return nodes[-1]


class NB201Supernet(nn.Module):
    """Supernet with one shared cell architecture: ``alphas_normal`` (6 x ops).
    ``layers`` is N, the number of cells per stage."""

    space = "nas-bench-201"
    cell_types = ("normal",)
    edge_normalization = False
    cpu_channels_last = True   # the layout its convolutions run fastest in on CPU (see prepare_supernet)

    def __init__(self, C: int = 16, layers: int = 5, num_classes: int = 10, exclude_none: bool = False):
        super().__init__()
        if layers < 1 or C < 1:
            raise ValueError(f"C and layers (cells per stage) must be >= 1, got C={C}, layers={layers}")
        self.op_names = tuple(op for op in NB201_OPS if not (exclude_none and op == "none"))
        self.none_index = self.op_names.index("none") if "none" in self.op_names else None
        self.n_edges = N_EDGES
        self.stem, self.layers, C_last = _skeleton(C, layers, lambda c: NB201SearchCell(c, self.op_names))
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_last), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_last, num_classes)
        n_ops = len(self.op_names)
        self.alphas_normal = nn.Parameter(torch.full((N_EDGES, n_ops), 1.0 / n_ops))

    def arch_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [("alphas_normal", self.alphas_normal)]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p is not self.alphas_normal]

    def arch_tensors(self) -> dict[str, tuple[nn.Parameter, None]]:
        return {"normal": (self.alphas_normal, None)}

    def raw_weights(self) -> dict[str, CellWeights]:
        return {"normal": CellWeights(self.alphas_normal)}

    def forward(self, x: torch.Tensor, weights: Optional[Mapping[str, CellWeights]] = None) -> torch.Tensor:
        cw = (self.raw_weights() if weights is None else weights)["normal"]
        active = cw.resolve_active(self.none_index)
        rows, _ = unpack(cw)
        rest = self._unsampled_weights(cw)
        h = self.stem(like_layout(x, self.stem[0].weight))
        for layer in self.layers:
            h = layer(h, rows, active, rest) if isinstance(layer, NB201SearchCell) else layer(h)
        h = self.global_pooling(self.lastact(h)).flatten(1)                         # (B, 4C)
        return self.classifier(h)                                                   # (B, classes)

    def genotype(self, weights: Mapping[str, CellWeights]) -> NB201Genotype:
        return derive_nb201(weights["normal"].ops, self.op_names)

    @staticmethod
    def _unsampled_weights(cw: CellWeights) -> Optional[list[torch.Tensor]]:
        """With one sampled op per edge and weights that take a gradient (GDAS's straight-through
        weights), per node the sum of the weights of the ops left out on its edges, as the
        reference GDAS's NAS-Bench-201 cell adds them to the node: value zero (their
        straight-through weights are ``0 - p + p``), gradient the sum of the node's upstream
        gradient, so every op's logit learns at every step, not only the sampled one's."""
        if cw.active is None or not cw.ops.requires_grad:
            return None
        # the sampled op is where a row's value is 1 (the others are 0 - p + p): found on the
        # device, with no host-to-device copy of ``active`` in the step
        picked = cw.ops.detach().argmax(-1)                                             # (edges,)
        left_out = 1.0 - F.one_hot(picked, cw.ops.shape[1]).to(cw.ops.dtype)          # (edges, ops)
        per_edge = (cw.ops * left_out).sum(-1)                                          # (edges,)
        return [part.sum() for part in per_edge.split([i for i in range(1, N_NODES)])]


class NB201Cell(nn.Module):
    def __init__(self, genotype: NB201Genotype, C: int):
        super().__init__()
        self.edges = genotype.edges
        self.ops = nn.ModuleList(create_op(op, C, 1, affine=True) for op, _ in self.edges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        e = 0
        for i in range(1, N_NODES):
            s = None
            for j in range(i):
                if self.edges[e][0] != "none":  # 'none' contributes zeros: skip it
                    y = self.ops[e](nodes[j])
                    s = y if s is None else s + y
                e += 1
            nodes.append(torch.zeros_like(x) if s is None else s)
        return nodes[-1]


class NB201Network(nn.Module):
    """The discrete NAS-Bench-201 network of an arch string (benchmark setting: C=16, N=5 cells
    per stage, given as ``layers``). Takes the DARTS network's keywords so trainers can build
    either alike; it has no auxiliary head, drop path or ImageNet stem. ``forward`` returns
    ``(logits, None)`` like the DARTS network."""

    space = "nas-bench-201"

    def __init__(self, genotype: NB201Genotype, C: int = 16, num_classes: int = 10, layers: int = 5,
                 auxiliary: bool = False, drop_path_prob: float = 0.0, variant: str = "cifar"):
        super().__init__()
        if auxiliary or drop_path_prob or variant != "cifar":
            raise ValueError("NAS-Bench-201 networks have no auxiliary head, drop path or ImageNet variant; "
                             "set auxiliary: false, drop_path_prob: 0 and variant: cifar")
        self.genotype = genotype
        self.drop_path_prob = 0.0
        self.auxiliary_head = None
        self.stem, self.layers, C_last = _skeleton(C, layers, lambda c: NB201Cell(genotype, c))
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_last), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_last, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        return self.classifier(self.global_pooling(self.lastact(h)).flatten(1)), None
