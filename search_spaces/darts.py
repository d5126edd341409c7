"""The DARTS CNN cell space: the weight-sharing supernet (with PC-DARTS partial channels and
edge normalization) and the discrete evaluation networks of a genotype (CIFAR and ImageNet)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arch import CellWeights
from .genotypes import DartsGenotype, derive_darts
from .layout import like_layout
from .mixed import EdgeGroup, EdgeInput, MixedEdge, PreparedCellWeights, accumulate
from .ops import DARTS_OPS, FactorizedReduce, ReLUConvBN, create_op


def channel_shuffle_cat(part: torch.Tensor, rest: torch.Tensor, groups: int) -> torch.Tensor:
    """``channel_shuffle(cat([part, rest], 1), groups)`` in a single copy.

    part: (B, q, H, W), rest: (B, (groups-1)*q, H, W) -> (B, groups*q, H, W), where output
    channel ``j*groups + g`` is input channel ``g*q + j`` of the concatenation."""
    B, q, H, W = part.shape
    rest = rest.view(B, groups - 1, q, H, W).transpose(1, 2)            # (B, q, groups-1, H, W)
    return torch.cat([part.unsqueeze(2), rest], dim=2).view(B, groups * q, H, W)


def edge_index(i: int, j: int) -> int:
    """The index of the edge from input ``j`` (0, 1: the cell inputs; 2+: earlier nodes) into
    node ``i``: edges are numbered node by node, each node's inputs in order."""
    return i * (i + 3) // 2 + j


def edge_groups(nodes: int) -> list[list[tuple[int, int]]]:
    """Per cell input j (0, 1: the cell inputs; 2+: the nodes), (node, edge index) of every
    edge leaving it: into all nodes from a cell input, into the later nodes from a node. The
    order in which an ``EdgeGroup`` computes them."""
    return [[(i, edge_index(i, j)) for i in range(max(0, j - 1), nodes)] for j in range(nodes + 1)]


class SearchCell(nn.Module):
    """A supernet cell (normal or, with ``reduction``, reduction): ``nodes`` intermediate
    nodes, each the sum of mixed edges from the two cell inputs and all earlier nodes. The
    edges leaving each input are computed together (``EdgeGroup``) once the input exists."""

    def __init__(self, C_pp: int, C_prev: int, C: int, reduction: bool, reduction_prev: bool,
                 op_names: Sequence[str], nodes: int, multiplier: int, partial_channels: int):
        super().__init__()
        if C % partial_channels:
            raise ValueError(f"channels {C} must be divisible by partial_channels K={partial_channels}")
        self.reduction = reduction
        self.nodes = nodes
        self.multiplier = multiplier
        self.K = partial_channels
        self.preprocess0 = (FactorizedReduce(C_pp, C, affine=False) if reduction_prev
                            else ReLUConvBN(C_pp, C, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(
            MixedEdge(C // partial_channels, 2 if reduction and j < 2 else 1, op_names)
            for i in range(nodes) for j in range(i + 2))
        self.pass_pool = nn.MaxPool2d(2, 2) if reduction and partial_channels > 1 else None
        self.groups = edge_groups(nodes)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: PreparedCellWeights) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        B, C, H, W = states[1].shape
        out_hw = (H // 2, W // 2) if self.reduction else (H, W)
        q = C // self.K
        parts: list[Optional[torch.Tensor]] = [None] * self.nodes   # per node: sum of its edges' op outputs
        rests: list[Optional[torch.Tensor]] = [None] * self.nodes   # PC-DARTS: the channels the ops skip
        for j, pairs in enumerate(self.groups):
            h = states[j]
            targets, ids = zip(*pairs)
            group = EdgeGroup([self.edges[e] for e in ids], EdgeInput(h if self.K == 1 else h[:, :q]))
            outs = group.forward(weights.by_input[j], [weights.active[e] for e in ids])
            rest = None
            if self.K > 1:
                rest = h[:, q:]
                if self.reduction and j < 2:
                    rest = self.pass_pool(rest)
            for i, y in zip(targets, outs):
                if y is not None:
                    parts[i] = y if parts[i] is None else parts[i] + y
                if rest is not None:
                    beta = weights.betas[i][j] if weights.betas is not None else 1.0
                    rests[i] = accumulate(rests[i], rest, beta)
            if j >= 1:  # node j-1 has all its edges
                i = j - 1
                part = parts[i] if parts[i] is not None else states[1].new_zeros(B, q, *out_hw)
                states.append(part if self.K == 1 else channel_shuffle_cat(part, rests[i], self.K))  # (B, C, H', W')
        return torch.cat(states[-self.multiplier:], dim=1)


class DartsSupernet(nn.Module):
    """The DARTS search network: stem, ``layers`` cells with reductions at 1/3 and 2/3 depth.

    Architecture parameters (``nn.Parameter`` s of this module, listed by
    ``arch_parameters()``): ``alphas_normal`` / ``alphas_reduce`` (edges x ops) and, with edge
    normalization, ``betas_normal`` / ``betas_reduce`` (one row per node over its inputs).
    They start as uniform rows; the architecture optimizer decides what they mean.
    """

    space = "darts"
    cell_types = ("normal", "reduce")
    cpu_channels_last = False  # its 4-16-channel depthwise ops run slower in channels-last on CPU

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, nodes: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, partial_channels: int = 1, edge_normalization: bool = False,
                 exclude_none: bool = False, in_channels: int = 3):
        super().__init__()
        if layers < 3:
            raise ValueError(f"layers must be >= 3 (two of them are reduction cells), got {layers}")
        if C < 1:
            raise ValueError(f"C must be >= 1, got {C}")
        self.op_names = tuple(op for op in DARTS_OPS if not (exclude_none and op == "none"))
        self.none_index = self.op_names.index("none") if "none" in self.op_names else None
        self.nodes, self.multiplier = nodes, multiplier
        self.n_edges = nodes * (nodes + 3) // 2
        self.edge_normalization = edge_normalization
        groups = [[e for _, e in pairs] for pairs in edge_groups(nodes)]
        self.group_sizes = tuple(len(g) for g in groups)
        # the edges in group order, on the supernet's device (a buffer: no host copy in forward,
        # and nothing created lazily for torch.compile to guard on)
        self.register_buffer("edge_order", torch.tensor([e for g in groups for e in g]), persistent=False)
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_pp, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(SearchCell(C_pp, C_prev, C_curr, reduction, reduction_prev, self.op_names,
                                         nodes, multiplier, partial_channels))
            reduction_prev = reduction
            C_pp, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        n_ops = len(self.op_names)
        for ct in self.cell_types:
            self.register_parameter(f"alphas_{ct}", nn.Parameter(torch.full((self.n_edges, n_ops), 1.0 / n_ops)))
            if edge_normalization:
                self.register_module(f"betas_{ct}", nn.ParameterList(
                    nn.Parameter(torch.full((i + 2,), 1.0 / (i + 2))) for i in range(nodes)))

    # -- architecture parameters -------------------------------------------------------
    def arch_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n.startswith(("alphas_", "betas_"))]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.arch_named_parameters()]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def arch_tensors(self) -> dict[str, tuple[nn.Parameter, Optional[Sequence[nn.Parameter]]]]:
        """Per cell type: (op parameter (edges, ops), per-node edge parameters or None)."""
        return {ct: (getattr(self, f"alphas_{ct}"), list(getattr(self, f"betas_{ct}")) if self.edge_normalization else None)
                for ct in self.cell_types}

    def raw_weights(self) -> dict[str, CellWeights]:
        """The parameters used as they are (GAEA's simplex weights)."""
        return {ct: CellWeights(ops, edges) for ct, (ops, edges) in self.arch_tensors().items()}

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weights: Optional[Mapping[str, CellWeights]] = None) -> torch.Tensor:
        weights = self.raw_weights() if weights is None else weights
        prepared = {}
        for ct in self.cell_types:
            cw = weights[ct]
            if self.edge_normalization and cw.edges is None:
                raise ValueError("this supernet uses edge normalization: CellWeights.edges is required")
            prepared[ct] = PreparedCellWeights(cw, self.none_index, self.edge_order, self.group_sizes)
        s0 = s1 = self.stem(like_layout(x, self.stem[0].weight))
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, prepared["reduce" if cell.reduction else "normal"])
        out = self.global_pooling(s1).flatten(1)                                    # (B, C_prev)
        return self.classifier(out)                                                 # (B, classes)

    def genotype(self, weights: Mapping[str, CellWeights]) -> DartsGenotype:
        """The discrete cell pair these (probability-like) weights select."""
        return derive_darts(weights["normal"].ops, weights["reduce"].ops, self.op_names,
                            weights["normal"].edges, weights["reduce"].edges, self.nodes, self.multiplier)


# ------------------------------------------------------------------ evaluation networks
def drop_path(x: torch.Tensor, drop_prob: torch.Tensor | float) -> torch.Tensor:
    """Zero whole samples of a branch with probability ``drop_prob`` (scaling the rest); at 0
    the branch passes unchanged."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask / keep


class Cell(nn.Module):
    """A discrete DARTS cell (normal or, with ``reduction``, reduction) of a genotype."""

    def __init__(self, genotype: DartsGenotype, C_pp: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(C_pp, C) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.inputs = [j for _, j in edges]
        self.op_names = [op for op, _ in edges]
        self.ops = nn.ModuleList(create_op(op, C, 2 if reduction and j < 2 else 1) for op, j in edges)
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: Optional[torch.Tensor]) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            s = None
            for k in (2 * i, 2 * i + 1):
                if self.op_names[k] == "none":
                    continue
                h = self.ops[k](states[self.inputs[k]])
                if self.training and drop_prob is not None and not isinstance(self.ops[k], nn.Identity):
                    h = drop_path(h, drop_prob)
                s = h if s is None else s + h
            if s is None:
                s = self.ops[2 * i](states[self.inputs[2 * i]])  # both 'none': zeros of the right shape
            states.append(s)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """The DARTS auxiliary classifier (8x8 input for CIFAR, 14x14 for ImageNet)."""

    def __init__(self, C: int, num_classes: int, imagenet: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=2 if imagenet else 3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class DartsNetwork(nn.Module):
    """The evaluation network of a DARTS genotype.

    ``variant='cifar'``: 3x3 stem with 3C channels (DARTS CIFAR: C=36, 20 cells).
    ``variant='imagenet'``: the stride-4 stem (two stride-2 convs, then a stride-2 cell input),
    for 224x224 inputs (DARTS ImageNet: C=48, 14 cells).
    ``forward`` returns ``(logits, aux_logits)``; ``aux_logits`` is None outside training or
    without the auxiliary head. ``drop_path_prob`` is an attribute the trainer ramps; its value
    lives in a buffer and ``drop_path_enabled`` (set once, true when any value is above 0)
    decides the control flow, so a compiled forward does not recompile as it ramps.
    """

    space = "darts"

    @property
    def drop_path_prob(self) -> float:
        return self._drop_path_prob

    @drop_path_prob.setter
    def drop_path_prob(self, p: float) -> None:
        self._drop_path_prob = float(p)
        self.drop_path_enabled = self.drop_path_enabled or p > 0
        with torch.no_grad():
            self.drop_prob.fill_(p)        # in place: no new tensor, no host-to-device copy

    def __init__(self, genotype: DartsGenotype, C: int = 36, num_classes: int = 10, layers: int = 20,
                 auxiliary: bool = True, drop_path_prob: float = 0.0, variant: str = "cifar", in_channels: int = 3):
        super().__init__()
        if variant not in ("cifar", "imagenet"):
            raise ValueError(f"unknown network variant {variant!r}; valid variants: cifar, imagenet")
        if layers < 3:
            raise ValueError(f"layers must be >= 3 (two of them are reduction cells), got {layers}")
        if C < 1:
            raise ValueError(f"C must be >= 1, got {C}")
        self.genotype = genotype
        self.register_buffer("drop_prob", torch.zeros(()), persistent=False)
        self.drop_path_enabled = False
        self.drop_path_prob = drop_path_prob
        self.aux_index = 2 * layers // 3
        imagenet = variant == "imagenet"
        if imagenet:
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
            self.stem1 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(C))
            C_pp, C_prev, C_curr, reduction_prev = C, C, C, True
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 3 * C, 3, padding=1, bias=False), nn.BatchNorm2d(3 * C))
            C_pp, C_prev, C_curr, reduction_prev = 3 * C, 3 * C, C, False
        self.imagenet = imagenet
        self.cells = nn.ModuleList()
        C_aux = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_pp, C_prev, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_prev = C_prev, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_prev
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes, imagenet) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.imagenet:
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
        else:
            s0 = s1 = self.stem(x)
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_prob if self.drop_path_enabled else None)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits, aux
