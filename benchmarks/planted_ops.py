"""Planted-op toy search: how fast each architecture optimizer finds the one op per edge that
can solve the task, and how sparse its weights get.

A toy supernet has E edges and, per edge, K ops ``read_k``; op k of edge e
reads its own block x_ek of the input (d dims) through the edge's learnt linear map A_e (the
shared weights). The supernet output is the weighted sum over ops and edges. The regression
target is ``sum_e B_e x_{e,p(e)}`` for fixed random B_e and a planted op p(e): the blocks
are independent, so only the planted op carries signal and every other op only adds noise;
the loss is minimal exactly at one-hot weights on the planted ops. (There is no ``none``
op: with shared weights, any mix of the planted op and ``none`` fits as well, the weights
absorbing the scale, so the optimum would not be unique.) Bilevel search (weight step
on one fresh batch, architecture step on another), squared error, the same budget for every
method.

    python benchmarks/planted_ops.py [--steps 300] [--seeds 0 1 2]

prints one JSON line per (method, settings, seed): weight on the planted op per edge (min
and mean), the first step at which every edge passed 0.9, and the mean per-edge entropy.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optimizers  # noqa: E402
from search_spaces import CellWeights  # noqa: E402


class PlantedSupernet(nn.Module):
    space = "toy"
    cell_types = ("normal",)
    edge_normalization = False

    def __init__(self, edges: int = 4, reads: int = 4, dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.op_names = tuple(f"read_{k}" for k in range(reads))
        self.none_index = None
        self.n_edges, self.dim = edges, dim
        n = len(self.op_names)
        self.A = nn.Parameter(torch.randn(edges, dim, dim, generator=g) / math.sqrt(dim))
        self.alphas_normal = nn.Parameter(torch.full((edges, n), 1.0 / n))
        self.B = torch.randn(edges, dim, dim, generator=g) / math.sqrt(dim)
        self.planted = [int(k) for k in torch.randint(reads, (edges,), generator=g)]

    def arch_parameters(self):
        return [self.alphas_normal]

    def weight_parameters(self):
        return [self.A]

    def arch_tensors(self):
        return {"normal": (self.alphas_normal, None)}

    def sample_inputs(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(batch, self.n_edges, len(self.op_names), self.dim, generator=generator)

    def forward(self, x: torch.Tensor, weights=None) -> torch.Tensor:
        cw = weights["normal"] if weights is not None else CellWeights(self.alphas_normal)
        active = cw.resolve_active(self.none_index)
        out = x.new_zeros(x.shape[0], self.dim) + 0 * self.A.sum()        # A always in the graph
        for e in range(self.n_edges):
            for k in active[e]:
                out = out + cw.ops[e, k] * (x[:, e, k] @ self.A[e].T)       # (B, d)
        return out

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return sum(x[:, e, p] @ self.B[e].T for e, p in enumerate(self.planted))

    def genotype(self, weights):
        return tuple(self.op_names[int(k)] for k in weights["normal"].ops.argmax(-1))


def run(method: str, settings: dict | None = None, steps: int = 300, seed: int = 0, batch: int = 32,
        weight_lr: float = 0.05) -> dict:
    torch.manual_seed(seed)
    net = PlantedSupernet(seed=seed)
    arch = optimizers.create(method, net, settings, seed=seed)
    opt = torch.optim.SGD(net.weight_parameters(), lr=weight_lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + seed)

    def step_fn():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sq_error(pred, y):
        return ((pred - y) ** 2).sum(-1).mean()

    planted_idx = torch.tensor(net.planted)
    first_pass = None
    for t in range(steps):
        arch.set_progress(t / max(steps - 1, 1))
        x, xv = net.sample_inputs(batch, gen), net.sample_inputs(batch, gen)
        optimizers.search_step(net, arch, x, net.target(x), xv, net.target(xv), weight_step=step_fn,
                               criterion=sq_error)
        planted = arch.probabilities()["normal"].ops[torch.arange(net.n_edges), planted_idx]
        if first_pass is None and bool((planted > 0.9).all()):
            first_pass = t + 1
    probs = arch.probabilities()
    planted = probs["normal"].ops[torch.arange(net.n_edges), planted_idx]
    stats = optimizers.entropy_stats(probs)
    return {"method": method, "settings": settings or "defaults", "seed": seed, "steps": steps,
            "planted_weight_min": round(float(planted.min()), 4), "planted_weight_mean": round(float(planted.mean()), 4),
            "all_edges_above_0.9": bool((planted > 0.9).all()), "first_step_all_above_0.9": first_pass,
            "argmax_is_planted": net.genotype(probs) == tuple(net.op_names[p] for p in net.planted),
            "entropy": round(stats["arch_entropy"], 4), "entropy_uniform": round(stats["arch_entropy_uniform"], 4)}


CONFIGS = [("gaea", None), ("darts", None), ("darts", {"lr": 0.01}), ("darts", {"lr": 0.1}), ("gdas", None),
           ("gdas", {"lr": 0.01}), ("gdas", {"lr": 0.1}), ("gaea_gdas", None), ("gaea_gdas", {"lr": 0.01})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    for method, settings in CONFIGS:
        for seed in args.seeds:
            print(json.dumps(run(method, settings, args.steps, seed)), flush=True)


if __name__ == "__main__":
    main()
