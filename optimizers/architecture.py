"""Architecture optimizers: each owns a parameterization of the supernet's architecture
parameters (what the mixed ops receive) and the rule that updates them.

=============  ===========================================  ==============================
name           op weights the supernet receives              update
=============  ===========================================  ==============================
``gaea``       the simplex parameters as they are            exponentiated gradient
``darts``      softmax of logits                              Adam (first order)
``gdas``       hard Gumbel-softmax one-hot per edge (ST)      Adam, temperature annealed
``gaea_gdas``  the same sampling from simplex parameters      exponentiated gradient
``random``     a uniformly sampled architecture per step      none; best of N scored at the end
=============  ===========================================  ==============================

Sampling uses a CPU generator seeded identically on every rank, so all ranks of a
distributed search draw the same architectures; its state is part of ``state_dict()``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from search_spaces import CellWeights
from search_spaces.genotypes import DartsGenotype, NB201Genotype

from .budget import CostBudget
from .eg import ExponentiatedGradient
from nas_settings import from_mapping

from .settings import DartsSettings, GaeaGdasSettings, GaeaSettings, GdasSettings, RandomSettings

Weights = dict[str, CellWeights]


class ArchitectureOptimizer:
    """Base class. Subclasses set ``name`` and ``Settings`` and implement ``reset_parameters``,
    ``weights`` and ``probabilities``."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    sampled: ClassVar[bool] = False     # one op per edge per step (unused ops cost nothing)
    learns: ClassVar[bool] = True       # has an update step

    def __init__(self, supernet: nn.Module, settings: Any = None, *, seed: int = 0,
                 budget: Optional[CostBudget] = None):
        if settings is None or isinstance(settings, Mapping):
            settings = from_mapping(self.Settings, settings, f"architecture optimizer {self.name!r}")
        if not isinstance(settings, self.Settings):
            raise TypeError(f"{self.name} expects {self.Settings.__name__}, got {type(settings).__name__}")
        self.supernet = supernet
        self.settings = settings
        self.seed = seed
        # The parameter sets never change: list them once (walking the modules every step costs).
        self._arch_params = list(supernet.arch_parameters())
        arch_ids = {id(p) for p in self._arch_params}
        self.weight_named_parameters = [(n, p) for n, p in supernet.named_parameters() if id(p) not in arch_ids]
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = 0.0
        self.budget = budget
        self.reset_parameters()
        self.optimizer: Optional[torch.optim.Optimizer] = self.build_optimizer()

    # -- parameterization ------------------------------------------------------------------
    def reset_parameters(self) -> None:
        raise NotImplementedError

    def build_optimizer(self) -> Optional[torch.optim.Optimizer]:
        raise NotImplementedError

    def weights(self, detach: bool = False) -> Weights:
        """What the supernet's forward consumes now; ``detach`` for the weight step."""
        raise NotImplementedError

    def distribution(self) -> Weights:
        """Per-edge distributions over ops (and per-node over edges), differentiable in the
        architecture parameters: what a cost budget's expected cost is taken over."""
        raise NotImplementedError

    @torch.no_grad()
    def probabilities(self) -> Weights:
        """``distribution()``, detached: what the genotype is derived from and what the
        entropy metrics describe."""
        return {ct: CellWeights(cw.ops.detach(), [e.detach() for e in cw.edges] if cw.edges is not None else None,
                                dense=cw.dense)
                for ct, cw in self.distribution().items()}

    def genotype(self):
        """The cell the genotype rule picks; under a budget, the nearest one within it
        (``CostBudget.repair``)."""
        probs = self.probabilities()
        genotype = self.supernet.genotype(probs)
        return self.budget.repair(genotype, probs) if self.budget is not None else genotype

    # -- update ----------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return self._arch_params if self.learns else []

    def sync_grads(self) -> None:
        """Average architecture gradients over ranks (they are kept out of DDP's buckets)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def budget_penalty(self) -> Optional[torch.Tensor]:
        """``multiplier * E[cost] / target`` (a 0-d tensor added to the architecture loss), or
        None without a budget."""
        if self.budget is None or not self.learns:
            return None
        return self.budget.penalty(self.distribution())

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            if self.budget is not None:
                self.budget.ascend(self.probabilities())

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def set_progress(self, fraction: float) -> None:
        """Where the search stands, in [0, 1] (drives temperature annealing)."""
        self.progress = min(max(float(fraction), 0.0), 1.0)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "progress": self.progress, "generator": self.generator.get_state(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "budget": self.budget.state_dict() if self.budget is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint is for architecture optimizer {state.get('name')!r}, not {self.name!r}")
        self.progress = state["progress"]
        self.generator.set_state(state["generator"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.budget is not None and state.get("budget") is not None:
            self.budget.load_state_dict(state["budget"])

    # -- helpers ---------------------------------------------------------------------------
    def _tensors(self) -> dict[str, tuple[nn.Parameter, Optional[Sequence[nn.Parameter]]]]:
        return self.supernet.arch_tensors()

    def _randn_like(self, p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=self.generator).to(device=p.device, dtype=p.dtype)


def _uniform_(params: Iterable[torch.Tensor]) -> None:
    with torch.no_grad():
        for p in params:
            p.fill_(1.0 / p.shape[-1])


def _maybe_detach(t: torch.Tensor, detach: bool) -> torch.Tensor:
    return t.detach() if detach else t


# ------------------------------------------------------------------------------------ GAEA
class Gaea(ArchitectureOptimizer):
    name = "gaea"
    Settings = GaeaSettings

    def reset_parameters(self) -> None:
        _uniform_(self.supernet.arch_parameters())

    def build_optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        ops = [t[0] for t in self._tensors().values()]
        edges = [e for t in self._tensors().values() if t[1] is not None for e in t[1]]
        groups = [{"params": ops, "lr": s.lr}]
        if edges:
            groups.append({"params": edges, "lr": s.edge_lr})
        return ExponentiatedGradient(groups, lr=s.lr, floor=s.floor, entropic_reg=s.entropic_reg)

    def weights(self, detach: bool = False) -> Weights:
        dense = self.settings.floor > 0  # EG with a floor never produces exact zeros
        return {ct: CellWeights(_maybe_detach(ops, detach),
                                [_maybe_detach(e, detach) for e in edges] if edges is not None else None, dense=dense)
                for ct, (ops, edges) in self._tensors().items()}

    def distribution(self) -> Weights:
        return Gaea.weights(self)


# ----------------------------------------------------------------------------------- DARTS
class Darts(ArchitectureOptimizer):
    name = "darts"
    Settings = DartsSettings

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in self.supernet.arch_parameters():
                p.copy_(self.settings.init_scale * self._randn_like(p))

    def build_optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.Adam(self.supernet.arch_parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)

    def _edges(self, edges, detach):
        return [F.softmax(_maybe_detach(e, detach), dim=-1) for e in edges] if edges is not None else None

    def weights(self, detach: bool = False) -> Weights:
        return {ct: CellWeights(F.softmax(_maybe_detach(ops, detach), dim=-1), self._edges(edges, detach), dense=True)
                for ct, (ops, edges) in self._tensors().items()}

    def distribution(self) -> Weights:
        return Darts.weights(self)


# ------------------------------------------------------------------------------------ GDAS
class Gdas(Darts):
    """Straight-through hard Gumbel-softmax over logits (Dong & Yang, 2019)."""

    name = "gdas"
    Settings = GdasSettings
    sampled = True

    @property
    def tau(self) -> float:
        s = self.settings
        return s.tau_max - (s.tau_max - s.tau_min) * self.progress

    def _log_probs(self, ops: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(ops, dim=-1)

    def weights(self, detach: bool = False) -> Weights:
        """One sample per call: the ops to run are chosen on the host (the supernet computes
        only those), from one device-to-host copy of all cell types' log-probabilities."""
        tensors = self._tensors()
        logps = {ct: self._log_probs(_maybe_detach(ops, detach)) for ct, (ops, _) in tensors.items()}
        on_host = torch.cat([lp.detach().double().flatten() for lp in logps.values()]).cpu().split(
            [lp.numel() for lp in logps.values()])                          # the one host sync
        out = {}
        for (ct, (ops, edges)), lp_host in zip(tensors.items(), on_host):
            logp = logps[ct]
            u = torch.rand(ops.shape, generator=self.generator, dtype=torch.float64)
            gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-12)))      # (edges, ops), on the CPU
            index = (lp_host.view(ops.shape) + gumbel).argmax(-1)           # the same choice on every rank
            soft = F.softmax((logp + gumbel.to(ops.device, ops.dtype)) / self.tau, dim=-1)
            hard = F.one_hot(index.to(ops.device), ops.shape[-1]).to(ops.dtype)
            out[ct] = CellWeights(hard - soft.detach() + soft, self._edges(edges, detach),
                                  active=tuple((int(k),) for k in index))
        return out


class GaeaGdas(Gdas):
    """GDAS sampling from simplex parameters updated by exponentiated gradient."""

    name = "gaea_gdas"
    Settings = GaeaGdasSettings

    reset_parameters = Gaea.reset_parameters
    build_optimizer = Gaea.build_optimizer

    def _log_probs(self, ops: torch.Tensor) -> torch.Tensor:
        return torch.log(ops)

    def _edges(self, edges, detach):
        return [_maybe_detach(e, detach) for e in edges] if edges is not None else None

    distribution = Gaea.distribution


# ------------------------------------------------------------------------ random search
def _sample_darts(supernet: nn.Module, generator: torch.Generator) -> tuple[Weights, DartsGenotype]:
    """A uniform DARTS cell pair: per node, two distinct inputs, a non-``none`` op on each."""
    ops = [k for k, name in enumerate(supernet.op_names) if name != "none"]
    weights, genes = {}, {}
    for ct in supernet.cell_types:
        w = torch.zeros(supernet.n_edges, len(supernet.op_names))
        active, edges, gene = [], [], []
        for i in range(supernet.nodes):
            chosen = torch.randperm(i + 2, generator=generator)[:2].sort().values.tolist()
            edges.append(torch.tensor([1.0 if j in chosen else 0.0 for j in range(i + 2)]))
            for j in range(i + 2):
                if j in chosen:
                    k = ops[int(torch.randint(len(ops), (1,), generator=generator))]
                    w[len(active), k] = 1.0
                    active.append((k,))
                    gene.append((supernet.op_names[k], j))
                else:
                    active.append(())
        weights[ct] = CellWeights(w, edges, active=tuple(active))
        genes[ct] = tuple(gene)
    concat = tuple(range(2 + supernet.nodes - supernet.multiplier, supernet.nodes + 2))
    return weights, DartsGenotype(genes["normal"], concat, genes["reduce"], concat)


def _sample_per_edge(supernet: nn.Module, generator: torch.Generator) -> tuple[Weights, Any]:
    """One op per edge, uniformly over all the space's ops (NAS-Bench-201 style)."""
    weights = {}
    for ct in supernet.cell_types:
        index = torch.randint(len(supernet.op_names), (supernet.n_edges,), generator=generator)
        weights[ct] = CellWeights(F.one_hot(index, len(supernet.op_names)).float(),
                                  active=tuple((int(k),) for k in index))
    return weights, supernet.genotype(weights)


_SAMPLERS: dict[str, Callable[[nn.Module, torch.Generator], tuple[Weights, Any]]] = {"darts": _sample_darts}


MAX_DRAWS = 10_000      # random cells drawn per sample before a budget is called too tight for random search


class RandomSearch(ArchitectureOptimizer):
    """Random search with weight sharing (Li & Talwalkar, 2019)."""

    name = "random"
    Settings = RandomSettings
    sampled = True
    learns = False

    def reset_parameters(self) -> None:
        _uniform_(self.supernet.arch_parameters())
        self.best: Optional[dict[str, Any]] = None

    def build_optimizer(self) -> None:
        return None

    def sample(self, generator: Optional[torch.Generator] = None) -> tuple[Weights, Any]:
        """A uniformly drawn architecture; under a budget, uniform over the cells within it
        (drawn until one is)."""
        sampler = _SAMPLERS.get(getattr(self.supernet, "space", ""), _sample_per_edge)
        for _ in range(MAX_DRAWS):
            weights, genotype = sampler(self.supernet, generator or self.generator)
            if self.budget is None or self.budget.within(genotype):
                break
        else:
            raise ValueError(f"random search: none of {MAX_DRAWS} random cells is within the budget "
                             f"({self.budget.target:g} {self.budget.table.metric}); raise the target")
        device = next(self.supernet.parameters()).device
        for cw in weights.values():
            cw.ops = cw.ops.to(device)
            if cw.edges is not None:
                cw.edges = [e.to(device) for e in cw.edges]
        return weights, genotype

    def weights(self, detach: bool = False) -> Weights:
        return self.sample()[0]

    @torch.no_grad()
    def probabilities(self) -> Weights:
        return {ct: CellWeights(torch.full_like(ops, 1.0 / ops.shape[-1]),
                                [torch.full_like(e, 1.0 / e.shape[-1]) for e in edges] if edges is not None else None)
                for ct, (ops, edges) in self._tensors().items()}

    def genotype(self):
        if self.best is not None:
            return self.best["genotype"]
        return self.sample(torch.Generator().manual_seed(self.seed))[1]

    @torch.no_grad()
    def select(self, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               criterion: Callable = F.cross_entropy, generator: Optional[torch.Generator] = None,
               architectures: Optional[Sequence[tuple[Weights, Any]]] = None) -> list[dict[str, Any]]:
        """Score ``settings.candidates`` sampled architectures (or the given ``(weights,
        genotype)`` pairs) on held-out ``batches`` with the shared weights; keep the best.

        Batches should be a class-mixed sample (the trial draws a seeded one). Batch norm uses
        each batch's statistics, running statistics left untouched: the supernet's running
        statistics average over every architecture sampled in training and describe none of
        the candidates, so eval-mode scores would rank candidates by how close their feature
        statistics happen to be to that average."""
        generator = generator or torch.Generator().manual_seed(self.seed + 1)
        if architectures is None:
            architectures = [self.sample(generator) for _ in range(self.settings.candidates)]
        results = []
        with _frozen_batchnorm(model):
            for weights, genotype in architectures:
                correct = total = 0
                loss = 0.0
                for x, y in batches[: self.settings.eval_batches]:
                    logits = model(x, weights)
                    loss += float(criterion(logits, y, reduction="sum"))
                    correct += int((logits.argmax(-1) == y).sum())
                    total += len(y)
                results.append({"genotype": genotype, "accuracy": correct / max(total, 1),
                                "loss": loss / max(total, 1)})
        best = max(results, key=lambda r: (r["accuracy"], -r["loss"]))
        self.best = best
        return results

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["best"] = None if self.best is None else {**self.best, "genotype": self.best["genotype"].to_json()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        best = state.get("best")
        if best is not None:
            gtype = DartsGenotype if best["genotype"]["space"] == "darts" else NB201Genotype
            best = {**best, "genotype": gtype.from_json(best["genotype"])}
        self.best = best


class _frozen_batchnorm:
    """Train-mode batch norm (batch statistics) without moving the running statistics."""

    def __init__(self, model: nn.Module):
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.momentum, m.training, m.num_batches_tracked.clone() if m.num_batches_tracked is not None
                       else None) for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
            m.train()
        return self

    def __exit__(self, *exc):
        for m, (momentum, training, nbt) in zip(self.bns, self.saved):
            m.momentum = momentum
            m.train(training)
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
        return False


# ---------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[ArchitectureOptimizer]] = {}


def register(cls: type[ArchitectureOptimizer]) -> type[ArchitectureOptimizer]:
    if cls.name in _REGISTRY:
        raise ValueError(f"architecture optimizer {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (Gaea, Darts, Gdas, GaeaGdas, RandomSearch):
    register(_cls)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> type[ArchitectureOptimizer]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture optimizer {name!r}; valid optimizers: {', '.join(_REGISTRY)}") from None


def create(name: str, supernet: nn.Module, settings: Any = None, *, seed: int = 0,
           budget: Optional[CostBudget] = None) -> ArchitectureOptimizer:
    """``create("gaea", supernet, {"lr": 0.1})``: settings as a dict (validated) or a settings
    object; ``budget``: a cost constraint the search meets (``optimizers.budget``)."""
    return get(name)(supernet, settings, seed=seed, budget=budget)


def entropy_stats(probs: Weights) -> dict[str, float]:
    """Mean per-edge entropy (nats) and mean max weight per edge, over all cell types."""
    rows = [cw.ops.detach().float() for cw in probs.values()]
    p = torch.cat(rows).clamp_min(1e-12)
    p = p / p.sum(-1, keepdim=True)
    ent = -(p * p.log()).sum(-1)
    return {"arch_entropy": float(ent.mean()), "arch_max_weight": float(p.max(-1).values.mean()),
            "arch_entropy_uniform": math.log(p.shape[-1])}
