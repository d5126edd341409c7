"""What a cell costs in the network that will be retrained: parameters, multiply-adds or
measured latency, as an additive model over the cell's edges.

For a target network (space, C, cells, variant, classes), ``CostTable.table[cell_type]`` holds
per edge (the supernet's edge order) and op (the space's op order) what that op on that edge
adds to the whole network, summed over every cell of that type; ``base`` is the rest (stem,
cell preprocessing, classifier). A genotype's cost is ``base`` plus its edges' entries.

* ``count_table(target, "params" | "macs")``: counted from the ops the network builds, at
  each cell's channels, stride and input size; equal to what the built network counts.
* ``latency.measure_table`` (``python -m search_spaces profile``): op latencies measured on a
  device, with the model's error against whole networks measured on the same device.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .darts import DartsNetwork, edge_index
from .genotypes import DartsGenotype, Genotype, NB201Genotype, nb201_from_ops
from .nb201 import EDGE_INPUTS, NB201Cell, NB201Network
from .ops import DARTS_OPS, NB201_OPS, create_op
from .profile import count_macs, count_parameters

METRICS = ("params", "macs", "latency_ms")

# The retraining protocols' networks (DARTS CIFAR: C=36, 20 cells; DARTS ImageNet: C=48, 14
# cells; NAS-Bench-201: C=16, N=5 cells per stage).
DEFAULT_TARGETS: dict[tuple[str, str], tuple[int, int]] = {
    ("darts", "cifar"): (36, 20), ("darts", "imagenet"): (48, 14), ("nas-bench-201", "cifar"): (16, 5)}


class CostError(ValueError):
    """A budget, target network or cost table that cannot be used; the message says why."""


@dataclass(frozen=True)
class TargetNetwork:
    """The network a cell will be retrained in. ``layers``: cells (darts) or cells per stage
    (nas-bench-201). DARTS cells are the supernet's: ``nodes`` nodes, the last ``multiplier``
    concatenated."""
    space: str
    init_channels: int
    layers: int
    variant: str = "cifar"
    classes: int = 10
    nodes: int = 4
    multiplier: int = 4

    @classmethod
    def default(cls, space: str, variant: str = "cifar", classes: int = 10, **kw: Any) -> "TargetNetwork":
        if (space, variant) not in DEFAULT_TARGETS:
            raise CostError(f"no {variant!r} network in search space {space!r}; valid: "
                            + ", ".join(f"{s}/{v}" for s, v in DEFAULT_TARGETS))
        C, layers = DEFAULT_TARGETS[(space, variant)]
        return cls(space, kw.pop("init_channels", None) or C, kw.pop("layers", None) or layers, variant, classes, **kw)

    def __post_init__(self) -> None:
        if (self.space, self.variant) not in DEFAULT_TARGETS:
            raise CostError(f"no {self.variant!r} network in search space {self.space!r}; valid: "
                            + ", ".join(f"{s}/{v}" for s, v in DEFAULT_TARGETS))
        if self.init_channels < 1 or self.layers < 1 or self.classes < 1:
            raise CostError("the target network's init_channels, layers and classes must be >= 1")
        if self.space == "darts" and self.layers < 3:
            raise CostError(f"a DARTS network needs >= 3 cells, got layers={self.layers}")

    @property
    def image_size(self) -> int:
        return 224 if self.variant == "imagenet" else 32

    @property
    def op_names(self) -> tuple[str, ...]:
        return DARTS_OPS if self.space == "darts" else NB201_OPS

    @property
    def cell_types(self) -> tuple[str, ...]:
        return ("normal", "reduce") if self.space == "darts" else ("normal",)

    @property
    def n_edges(self) -> int:
        return self.nodes * (self.nodes + 3) // 2 if self.space == "darts" else len(EDGE_INPUTS)

    @property
    def concat(self) -> tuple[int, ...]:
        return tuple(range(2 + self.nodes - self.multiplier, self.nodes + 2))

    def describe(self) -> str:
        return (f"{self.space} {self.variant} C={self.init_channels} layers={self.layers} "
                f"classes={self.classes}")

    def build(self, genotype: Genotype) -> nn.Module:
        """The network of ``genotype`` (no auxiliary head: it is not part of the shipped network)."""
        if self.space == "darts":
            return DartsNetwork(genotype, C=self.init_channels, num_classes=self.classes, layers=self.layers,
                                auxiliary=False, variant=self.variant)
        return NB201Network(genotype, C=self.init_channels, num_classes=self.classes, layers=self.layers)

    def reference_genotype(self) -> Genotype:
        """Any cell of the space's shape (the base cost is measured on it)."""
        if self.space == "darts":
            cell = tuple(("sep_conv_3x3", j) for _ in range(self.nodes) for j in (0, 1))
            return DartsGenotype(cell, self.concat, cell, self.concat)
        return NB201Genotype(tuple(tuple(("nor_conv_3x3", j) for j in range(i)) for i in range(1, 4)))

    def edge_slots(self, genotype: Genotype) -> dict[str, list[tuple[int, str]]]:
        """Per cell type, (edge index, op) of every edge the genotype keeps."""
        if self.space == "darts":
            if not isinstance(genotype, DartsGenotype):
                raise CostError(f"a {genotype.space} cell has no cost in a {self.space} network")
            out = {}
            for ct, edges, concat in (("normal", genotype.normal, genotype.normal_concat),
                                      ("reduce", genotype.reduce, genotype.reduce_concat)):
                if len(edges) != 2 * self.nodes or tuple(concat) != self.concat:
                    raise CostError(f"the cost model is for cells of {self.nodes} nodes concatenating "
                                    f"{list(self.concat)}; this cell has {len(edges) // 2} nodes and {list(concat)}")
                out[ct] = [(edge_index(k // 2, j), op) for k, (op, j) in enumerate(edges)]
            return out
        if not isinstance(genotype, NB201Genotype):
            raise CostError(f"a {genotype.space} cell has no cost in a {self.space} network")
        return {"normal": [(e, op) for e, (op, _) in enumerate(genotype.edges)]}

    def cell_shapes(self) -> list[tuple[str, int, int, bool]]:
        """Per cell of the network, in order: (cell type, channels C of its ops, input height,
        reduction), read from the built network's forward."""
        net = self.build(self.reference_genotype()).eval()
        cells = [m for m in net.modules() if isinstance(m, NB201Cell)] if self.space == "nas-bench-201" \
            else list(net.cells)
        shapes: list[tuple[str, int, int, bool]] = []

        def hook(module, args):
            x = args[1] if self.space == "darts" else args[0]      # darts: (s0, s1, drop); nb201: (x,)
            reduction = bool(getattr(module, "reduction", False))
            C = module.preprocess1[1].out_channels if self.space == "darts" else x.shape[1]
            shapes.append(("reduce" if reduction else "normal", C, x.shape[-1], reduction))

        handles = [c.register_forward_pre_hook(hook) for c in cells]
        try:
            with torch.no_grad():
                net(torch.zeros(1, 3, self.image_size, self.image_size))
        finally:
            for h in handles:
                h.remove()
        return shapes

    def edge_inputs(self) -> list[int]:
        """Per edge index, the input it reads (darts: 0, 1 the cell inputs, 2+ the nodes)."""
        if self.space == "darts":
            return [j for i in range(self.nodes) for j in range(i + 2)]
        return [j for _, j in EDGE_INPUTS]


OpCost = Callable[[str, int, int, int], float]     # (op, C, stride, input height) -> cost


@dataclass(frozen=True)
class CostTable:
    """An additive cost model of one target network (see the module docstring)."""
    metric: str
    network: TargetNetwork
    table: dict                 # cell type -> per edge -> per op (the space's op order)
    base: float
    measured: dict = field(default_factory=dict)    # latency: device, versions, batch, precision, error

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise CostError(f"unknown cost metric {self.metric!r}; valid metrics: {', '.join(METRICS)}")

    def cost(self, genotype: Genotype) -> float:
        total = self.base
        for ct, slots in self.network.edge_slots(genotype).items():
            names = self.network.op_names
            total += sum(self.table[ct][e][names.index(op)] for e, op in slots)
        return float(total)

    def cheapest(self, op_names: Optional[Sequence[str]] = None) -> tuple[float, Genotype]:
        """The cheapest cell of the space and its cost (DARTS: two distinct inputs per node,
        ops other than ``none``; NAS-Bench-201: any op on each edge), with the ops
        ``op_names`` (a supernet's, which may leave ``none`` out; default: all)."""
        names = self.network.op_names
        allowed = [k for k, n in enumerate(names) if op_names is None or n in op_names]
        if self.network.space == "nas-bench-201":
            row = self.table["normal"]
            g: Genotype = nb201_from_ops([names[min(allowed, key=lambda k: row[e][k])] for e in range(len(row))])
            return self.cost(g), g
        usable = [k for k in allowed if names[k] != "none"]
        cells = {}
        for ct in self.network.cell_types:
            rows, gene, start = self.table[ct], [], 0
            for i in range(self.network.nodes):
                options = sorted((min(rows[start + j][k] for k in usable), j) for j in range(i + 2))[:2]
                for _, j in sorted(options, key=lambda t: t[1]):
                    k = min(usable, key=lambda k: rows[start + j][k])
                    gene.append((names[k], j))
                start += i + 2
            cells[ct] = tuple(gene)
        g = DartsGenotype(cells["normal"], self.network.concat, cells["reduce"], self.network.concat)
        return self.cost(g), g

    def tensors(self, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        """Per cell type, the table as an (edges, ops) float32 tensor."""
        return {ct: torch.tensor(self.table[ct], dtype=torch.float32, device=device) for ct in self.network.cell_types}

    # -- files --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "network": asdict(self.network), "op_names": list(self.network.op_names),
                "base": self.base, "table": self.table, "measured": self.measured}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CostTable":
        try:
            network = TargetNetwork(**data["network"])
            table = {ct: [[float(v) for v in row] for row in data["table"][ct]] for ct in network.cell_types}
            if list(data["op_names"]) != list(network.op_names):
                raise CostError(f"its ops {data['op_names']} are not the {network.space} space's")
            for ct, rows in table.items():
                if len(rows) != network.n_edges or any(len(r) != len(network.op_names) for r in rows):
                    raise CostError(f"its {ct} table is not {network.n_edges} edges x {len(network.op_names)} ops")
            return cls(str(data["metric"]), network, table, float(data["base"]), dict(data.get("measured") or {}))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CostError):
                raise
            raise CostError(f"not a cost table ({type(e).__name__}: {e})") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostTable":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise CostError(f"cost table {path}: no such file (make one with `python -m search_spaces profile`)") \
                from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CostError(f"cost table {path} does not parse as JSON ({e}); make it with "
                            "`python -m search_spaces profile`") from None
        if not isinstance(data, dict):
            raise CostError(f"cost table {path}: not a JSON object")
        try:
            return cls.from_json(data)
        except CostError as e:
            raise CostError(f"cost table {path}: {e}") from None


def additive_table(target: TargetNetwork, metric: str, op_cost: OpCost, base: float = 0.0,
                   measured: Optional[dict] = None) -> CostTable:
    """Sum ``op_cost`` over the cells of each type for every (edge, op)."""
    shapes = target.cell_shapes()
    inputs = target.edge_inputs()
    table = {ct: [[0.0] * len(target.op_names) for _ in range(target.n_edges)] for ct in target.cell_types}
    for ct, C, H, reduction in shapes:
        for e, j in enumerate(inputs):
            stride = 2 if reduction and j < 2 else 1
            H_in = H if j < 2 or not reduction else math.ceil(H / 2)     # nodes of a reduction cell: halved
            for k, op in enumerate(target.op_names):
                table[ct][e][k] += op_cost(op, C, stride, H_in)
    return CostTable(metric, target, table, base, measured or {})


def _counter(metric: str) -> OpCost:
    cache: dict[tuple, float] = {}

    def cost(op: str, C: int, stride: int, H: int) -> float:
        key = (op, C, stride, H)
        if key not in cache:
            module = create_op(op, C, stride)
            cache[key] = float(count_parameters(module) if metric == "params" else count_macs(module, (1, C, H, H)))
        return cache[key]

    return cost


def count_table(target: TargetNetwork, metric: str) -> CostTable:
    """Parameters (as ``count_parameters``: no auxiliary head) or multiply-adds (as
    ``count_macs`` at the variant's image size) of ``target``, as an additive table."""
    if metric not in ("params", "macs"):
        raise CostError(f"count_table counts params or macs, not {metric!r} (latency is measured: "
                        "`python -m search_spaces profile`)")
    table = additive_table(target, metric, _counter(metric))
    ref = target.reference_genotype()
    net = target.build(ref)
    whole = count_parameters(net) if metric == "params" else count_macs(net, (1, 3, target.image_size,
                                                                             target.image_size))
    return CostTable(metric, target, table.table, float(whole) - table.cost(ref))


def genotype_cost(target: TargetNetwork, genotype: Genotype, metric: str) -> int:
    """What the built network of ``genotype`` counts (the model's reference)."""
    net = target.build(genotype)
    if metric == "params":
        return count_parameters(net)
    return count_macs(net, (1, 3, target.image_size, target.image_size))


def random_genotype(target: TargetNetwork, generator: torch.Generator) -> Genotype:
    """A uniformly drawn cell of the target's space and shape (DARTS: two distinct inputs per
    node, no ``none``; NAS-Bench-201: any op per edge)."""
    names = target.op_names
    if target.space == "nas-bench-201":
        pick = lambda: names[int(torch.randint(len(names), (1,), generator=generator))]  # noqa: E731
        return NB201Genotype(tuple(tuple((pick(), j) for j in range(i)) for i in range(1, 4)))
    usable = [n for n in names if n != "none"]
    cells = []
    for _ in target.cell_types:
        gene = []
        for i in range(target.nodes):
            for j in sorted(torch.randperm(i + 2, generator=generator)[:2].tolist()):
                gene.append((usable[int(torch.randint(len(usable), (1,), generator=generator))], j))
        cells.append(tuple(gene))
    return DartsGenotype(cells[0], target.concat, cells[1], target.concat)
