"""Architecture optimizers for weight-sharing NAS: GAEA's exponentiated gradient, and the
DARTS (first order), GDAS and random-search baselines, behind one interface and one search
step that a plain PyTorch loop or a Determined trial drives.

    import optimizers
    arch = optimizers.create("gaea", supernet, {"lr": 0.1})
    optimizers.search_step(supernet, arch, x_train, y_train, x_val, y_val, weight_step=step_fn)

No Determined import here.
"""
from .architecture import (ArchitectureOptimizer, Darts, Gaea, GaeaGdas, Gdas, RandomSearch, create, entropy_stats,
                           get, names, register)
from .budget import BudgetSettings, CostBudget
from .eg import ExponentiatedGradient
from .search import NonFiniteLossError, StepResult, prepare_supernet, search_step
from .settings import DartsSettings, GaeaGdasSettings, GaeaSettings, GdasSettings, RandomSettings

__all__ = [
    "ArchitectureOptimizer", "BudgetSettings", "CostBudget", "Darts", "DartsSettings", "ExponentiatedGradient", "Gaea", "GaeaGdas",
    "GaeaGdasSettings", "GaeaSettings", "Gdas", "GdasSettings", "NonFiniteLossError", "RandomSearch",
    "RandomSettings", "StepResult", "create", "entropy_stats", "get", "names", "prepare_supernet",
    "register", "search_step",
]
