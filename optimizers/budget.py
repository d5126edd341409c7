"""A cost budget the search meets: ``cost(cell) <= target``, by dual ascent.

The architecture step minimises ``loss + lam * E[cost] / target``. ``E[cost]`` is the cost of
the target network expected under the architecture distribution (``CostTable``: per edge
and op, what the op adds to that network), differentiable in the architecture weights:

* NAS-Bench-201 (one op per edge): ``base + sum_e sum_k p[e,k] c[e,k]``, exact for a cell
  drawn from ``p``.
* DARTS (two of a node's inputs kept, ``none`` never): per node, each input ``j`` is kept
  with weight ``q_j`` proportional to ``beta_j * m_j`` (``beta``: the edge weights, 1 without
  edge normalization; ``m_j``: the mass on ops other than ``none``), and its op is drawn from
  the non-``none`` weights renormalised; a node costs ``2 sum_j q_j cbar_j``. An
  approximation of what the genotype rule picks (``2 q_j`` can exceed 1), exact for uniform
  weights and for one-hot ones.

After every architecture step the multiplier takes one projected ascent step on the
violation of the discrete cell, the one the genotype rule picks now:
``lam <- max(0, lam + dual_lr * (cost(cell) / target - 1))``. It rises while the cell is
over budget and falls back to 0 when it is under, so the user states the target, not a
penalty weight. Everything stays on the device (no host read in the step).

GAEA's exponentiated gradient step is the paper's rule with the cost gradient added:
``theta <- theta * exp(-lr * (grad loss + lam * c / target))``, renormalised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from nas_settings import check as _check
from search_spaces import CellWeights
from search_spaces.cost import METRICS, CostError, CostTable, TargetNetwork, count_table
from search_spaces.genotypes import nb201_from_ops

Weights = dict[str, CellWeights]


@dataclass(frozen=True)
class BudgetSettings:
    """``budget`` in a search's hyperparameters: the cell's cost in the target network must not
    exceed ``target`` (parameters, multiply-adds, or milliseconds from a latency table)."""
    metric: str                          # params | macs | latency_ms
    target: float
    table: Optional[str] = None          # latency_ms: the table `python -m search_spaces profile` wrote
    init_channels: Optional[int] = None  # the target network (null: the retraining protocol's, or the table's)
    layers: Optional[int] = None
    variant: str = "cifar"               # darts: cifar | imagenet
    classes: Optional[int] = None        # null: the search data's classes (a latency table: its own)
    device: Optional[str] = None         # latency_ms: the device the table must have been measured on (cpu, cuda)
    dual_lr: float = 0.05                # multiplier step per architecture step, per unit of relative violation

    def __post_init__(self) -> None:
        _check(self.metric in METRICS, f"budget: unknown metric {self.metric!r}; valid metrics: {', '.join(METRICS)}")
        _check(isinstance(self.target, (int, float)) and self.target > 0,
               f"budget: target must be a number > 0, got {self.target!r}")
        _check((self.table is not None) == (self.metric == "latency_ms"),
               "budget: metric latency_ms needs `table` (a file from `python -m search_spaces profile`), "
               "and params and macs take none")
        _check(self.device is None or self.metric == "latency_ms", "budget: device applies to latency_ms only")
        _check(self.dual_lr >= 0, f"budget: dual_lr must be >= 0, got {self.dual_lr}")

    def cost_table(self, space: str, classes: int, nodes: int = 4, multiplier: int = 4,
                   op_names: Optional[tuple[str, ...]] = None) -> CostTable:
        """Count the table (params, macs) or load the latency table and check that it is for
        this space, target network and device, and that a cell with the supernet's ops
        (``op_names``) can meet the target. Raises ``CostError`` (one line)."""
        if self.metric != "latency_ms":
            target = TargetNetwork.default(space, self.variant, self.classes or classes, nodes=nodes,
                                           multiplier=multiplier, init_channels=self.init_channels,
                                           layers=self.layers)
            table = count_table(target, self.metric)
        else:
            table = CostTable.load(self.table)
            net = table.network
            if table.metric != "latency_ms":
                raise CostError(f"budget table {self.table} holds {table.metric}, not latency_ms")
            if net.space != space:
                raise CostError(f"budget table {self.table} is for search space {net.space!r}, this search's is "
                                f"{space!r}; profile the {space} space")
            wanted = TargetNetwork.default(space, self.variant, self.classes or net.classes, nodes=nodes,
                                           multiplier=multiplier, init_channels=self.init_channels,
                                           layers=self.layers)
            if wanted != net:
                raise CostError(f"budget table {self.table} was measured on {net.describe()}, the budget's target "
                                f"network is {wanted.describe()}; profile that network or set init_channels, "
                                "layers, variant and classes in the budget to the table's")
            measured_on = str(table.measured.get("device", ""))
            if self.device is not None and not measured_on.startswith(self.device):
                raise CostError(f"budget table {self.table} was measured on {measured_on or 'an unknown device'}, "
                                f"the budget says device {self.device!r}; profile on that device")
        cheapest, cell = table.cheapest(op_names)
        if self.target < cheapest:
            raise CostError(f"budget target {self.target:g} {self.metric} is below the cheapest cell of the "
                            f"{space} space in {table.network.describe()}: {cheapest:.6g} ({cell.to_str()}); "
                            "raise the target")
        return table


class CostBudget:
    """The constraint, its multiplier and the expected / discrete cost of a supernet's
    architecture distribution; costs are relative to the target (1.0 = on budget)."""

    def __init__(self, table: CostTable, target: float, *, dual_lr: float = 0.05,
                 op_names: Optional[tuple[str, ...]] = None, device: Optional[torch.device] = None):
        if not target > 0:
            raise ValueError(f"the budget target must be > 0, got {target}")
        if not dual_lr >= 0:
            raise ValueError(f"dual_lr must be >= 0, got {dual_lr}")
        self.table, self.target, self.dual_lr = table, float(target), float(dual_lr)
        self.space = table.network.space
        self.nodes = table.network.nodes
        # the supernet's ops (it may leave ``none`` out), as columns of the table
        self.op_names = tuple(op_names or table.network.op_names)
        unknown = [op for op in self.op_names if op not in table.network.op_names]
        if unknown:
            raise CostError(f"the cost table has no cost for op(s) {', '.join(unknown)}")
        columns = torch.tensor([table.network.op_names.index(op) for op in self.op_names])
        self.costs = {ct: (t[:, columns.to(t.device)] / self.target)
                      for ct, t in table.tensors(device).items()}                   # (edges, ops)
        self.base = table.base / self.target
        self.multiplier = torch.zeros((), device=device)
        self.usable = [k for k, n in enumerate(self.op_names) if n != "none"]

    @classmethod
    def from_settings(cls, settings: BudgetSettings, supernet: Any, classes: int,
                      device: Optional[torch.device] = None) -> "CostBudget":
        """The budget of a supernet's search (the target network's cells shaped as its cells)."""
        table = settings.cost_table(supernet.space, classes, nodes=getattr(supernet, "nodes", 4),
                                    multiplier=getattr(supernet, "multiplier", 4), op_names=supernet.op_names)
        return cls(table, settings.target, dual_lr=settings.dual_lr, op_names=supernet.op_names, device=device)

    def within(self, genotype: Any) -> bool:
        """The cell's cost does not exceed the target (host arithmetic, no device)."""
        return self.table.cost(genotype) <= self.target

    @torch.no_grad()
    def repair(self, genotype: Any, dist: Weights) -> Any:
        """The cell the search returns: the genotype rule's cell when it is within the target;
        otherwise that cell changed, one edge at a time, by the change that gives up the least
        architecture weight per unit of cost saved (another op on a kept edge; for DARTS also
        another input of the node, with any op), until it is within. Dual ascent brings the
        rule's cell to the target; this guarantees the last step's cell meets it. Host
        arithmetic: call outside the step."""
        if self.within(genotype):
            return genotype
        names = self.table.network.op_names
        ops = [n for n in self.op_names if not (self.space == "darts" and n == "none")]
        rows = {ct: cw.ops.float().cpu().tolist() for ct, cw in dist.items()}
        betas = {ct: [e.float().cpu().tolist() for e in cw.edges] if cw.edges is not None else None
                 for ct, cw in dist.items()}
        # per cell type, per node: {input: op}; NAS-Bench-201: one "node" per edge, input 0
        if self.space == "darts":
            from search_spaces.darts import edge_index
            cells = {ct: [dict((j, op) for op, j in edges[2 * i:2 * i + 2]) for i in range(self.nodes)]
                     for ct, edges in (("normal", genotype.normal), ("reduce", genotype.reduce))}
            edge_of = lambda i, j: edge_index(i, j)                                    # noqa: E731
            inputs = lambda i: range(i + 2)                                            # noqa: E731
        else:
            cells = {"normal": [{0: op} for op, _ in genotype.edges]}
            edge_of = lambda i, j: i                                                   # noqa: E731
            inputs = lambda i: (0,)                                                    # noqa: E731

        def weight(ct: str, i: int, j: int, op: str) -> float:
            w = rows[ct][edge_of(i, j)][self.op_names.index(op)]
            return w * betas[ct][i][j] if betas[ct] is not None else w

        def cost(ct: str, i: int, j: int, op: str) -> float:
            return self.table.table[ct][edge_of(i, j)][names.index(op)]

        def total() -> float:
            return self.table.base + sum(cost(ct, i, j, op) for ct, nodes in cells.items()
                                         for i, kept in enumerate(nodes) for j, op in kept.items())

        while total() > self.target:
            best = None
            for ct, nodes in cells.items():
                for i, kept in enumerate(nodes):
                    for j, op in kept.items():
                        for j2 in inputs(i):
                            if j2 != j and j2 in kept:
                                continue
                            for op2 in ops:
                                saved = cost(ct, i, j, op) - cost(ct, i, j2, op2)
                                if saved > 0:
                                    ratio = (weight(ct, i, j, op) - weight(ct, i, j2, op2)) / saved
                                    if best is None or ratio < best[0]:
                                        best = (ratio, saved, ct, i, j, j2, op2)
            if best is None:                     # nothing cheaper to change to: the target is below the cheapest
                return self.table.cheapest(self.op_names)[1]
            _, _, ct, i, j, j2, op2 = best
            del cells[ct][i][j]
            cells[ct][i][j2] = op2
        if self.space == "darts":
            cell = {ct: tuple((op, j) for node in nodes for j, op in sorted(node.items())) for ct, nodes in cells.items()}
            return type(genotype)(cell["normal"], genotype.normal_concat, cell["reduce"], genotype.reduce_concat)
        return nb201_from_ops([node[0] for node in cells["normal"]])

    def _check(self, dist: Weights) -> None:
        for ct, cw in dist.items():
            if tuple(cw.ops.shape) != tuple(self.costs[ct].shape):
                raise ValueError(f"the supernet's {ct} op weights are {tuple(cw.ops.shape)}, the cost table's "
                                 f"{tuple(self.costs[ct].shape)}: the table is for another op list or cell")

    # -- costs, relative to the target --------------------------------------------------
    def expected(self, dist: Weights) -> torch.Tensor:
        """E[cost] / target under the distribution, differentiable in it (a 0-d tensor)."""
        self._check(dist)
        total = torch.zeros((), device=self.multiplier.device)
        for ct, cw in dist.items():
            c = self.costs[ct].to(cw.ops.dtype)
            if self.space != "darts":
                total = total + (cw.ops * c).sum()
                continue
            p = cw.ops[:, self.usable]                                      # (edges, usable ops)
            cu = c[:, self.usable]
            mass = p.sum(-1)                                                # (edges,)
            mean = (p * cu).sum(-1) / mass.clamp_min(1e-12)                 # (edges,) cost of the op drawn
            start = 0
            for i in range(self.nodes):
                n = i + 2
                keep = mass[start:start + n]
                if cw.edges is not None:
                    keep = keep * cw.edges[i]
                q = keep / keep.sum().clamp_min(1e-12)                      # (n,) chance of each input
                total = total + 2 * (q * mean[start:start + n]).sum()
                start += n
        return total + self.base

    @torch.no_grad()
    def discrete(self, dist: Weights) -> torch.Tensor:
        """cost(cell) / target of the cell the genotype rule picks from ``dist`` (0-d, on the
        device; the rule as ``derive_darts`` / ``derive_nb201`` apply it)."""
        self._check(dist)
        total = torch.zeros((), device=self.multiplier.device)
        for ct, cw in dist.items():
            c = self.costs[ct]
            w = cw.ops.float()
            if self.space != "darts":
                total = total + c.gather(1, w.argmax(-1, keepdim=True)).sum()
                continue
            w, cu = w[:, self.usable], c[:, self.usable]
            start = 0
            for i in range(self.nodes):
                n = i + 2
                rows = w[start:start + n]
                if cw.edges is not None:
                    rows = rows * cw.edges[i].float()[:, None]
                best = rows.argmax(-1, keepdim=True)                        # (n, 1) op per input
                strength = rows.gather(1, best).squeeze(1)                  # (n,)
                keep = torch.sort(strength, descending=True, stable=True).indices[:2]   # lower input wins ties
                total = total + cu[start:start + n].gather(1, best).squeeze(1)[keep].sum()
                start += n
        return total + self.base

    # -- the multiplier -----------------------------------------------------------------
    def penalty(self, dist: Weights) -> torch.Tensor:
        """``lam * E[cost] / target``: added to the architecture loss."""
        return self.multiplier * self.expected(dist)

    @torch.no_grad()
    def ascend(self, dist: Weights) -> None:
        """One projected dual-ascent step on the discrete cell's violation."""
        violation = self.discrete(dist) - 1.0
        self.multiplier.copy_((self.multiplier + self.dual_lr * violation).clamp_min(0.0))

    def metrics(self, dist: Weights) -> dict[str, float]:
        """Host values for a validation: the genotype rule's cell's cost (before ``repair``),
        the expected cost (absolute units) and the multiplier. Reads the device: call outside
        the step."""
        with torch.no_grad():
            values = torch.stack([self.discrete(dist), self.expected(dist), self.multiplier]).tolist()
        return {"budget_rule_cell": values[0] * self.target, "budget_expected": values[1] * self.target,
                "budget_multiplier": values[2], "budget_target": self.target}

    def state_dict(self) -> dict[str, Any]:
        return {"multiplier": self.multiplier.detach().cpu(), "target": self.target, "metric": self.table.metric}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.multiplier.copy_(torch.as_tensor(state["multiplier"]).to(self.multiplier.device))
