"""The architecture optimizers' settings, built from plain dicts (YAML hyperparameters) by
:func:`nas_settings.from_mapping`."""
from __future__ import annotations

from dataclasses import dataclass

from nas_settings import check as _check


@dataclass(frozen=True)
class GaeaSettings:
    """GAEA: exponentiated gradient on simplex op weights (and per-node edge weights)."""
    lr: float = 0.1               # EG step size for op weights
    edge_lr: float = 0.1          # EG step size for edge weights (edge normalization)
    floor: float = 1e-5           # smallest weight kept after a step
    entropic_reg: float = 0.0     # lambda of the KL(theta || uniform) regulariser

    def __post_init__(self) -> None:
        _check(self.lr >= 0 and self.edge_lr >= 0, "gaea: lr and edge_lr must be >= 0")
        _check(0 <= self.floor < 0.01, "gaea: floor must be in [0, 0.01)")
        _check(self.entropic_reg >= 0, "gaea: entropic_reg must be >= 0")


@dataclass(frozen=True)
class DartsSettings:
    """First-order DARTS: softmax over logits, Adam."""
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-3
    init_scale: float = 1e-3      # logits start as init_scale * N(0, 1)

    def __post_init__(self) -> None:
        _check(self.lr >= 0, "darts: lr must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "darts: betas must be in [0, 1)")
        _check(self.weight_decay >= 0 and self.init_scale >= 0, "darts: weight_decay and init_scale must be >= 0")


@dataclass(frozen=True)
class GdasSettings:
    """GDAS: hard Gumbel-softmax sample per edge, straight-through gradient, Adam on logits."""
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-3
    init_scale: float = 1e-3
    tau_max: float = 10.0         # temperature at the start of the search ...
    tau_min: float = 0.1          # ... annealed linearly to this at the end

    def __post_init__(self) -> None:
        _check(self.lr >= 0, "gdas: lr must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "gdas: betas must be in [0, 1)")
        _check(0 < self.tau_min <= self.tau_max, "gdas: need 0 < tau_min <= tau_max")


@dataclass(frozen=True)
class GaeaGdasSettings:
    """GAEA GDAS: GDAS sampling from simplex weights updated by exponentiated gradient."""
    lr: float = 0.1
    edge_lr: float = 0.1
    floor: float = 1e-5
    entropic_reg: float = 0.0
    tau_max: float = 10.0
    tau_min: float = 0.1

    def __post_init__(self) -> None:
        _check(self.lr >= 0 and self.edge_lr >= 0, "gaea_gdas: lr and edge_lr must be >= 0")
        _check(0 <= self.floor < 0.01, "gaea_gdas: floor must be in [0, 0.01)")
        _check(0 < self.tau_min <= self.tau_max, "gaea_gdas: need 0 < tau_min <= tau_max")


@dataclass(frozen=True)
class RandomSettings:
    """Random search with weight sharing: a uniform architecture per step; at the end the best
    of ``candidates`` sampled architectures on held-out batches."""
    candidates: int = 100         # architectures scored at selection time
    eval_batches: int = 10        # held-out batches each candidate is scored on

    def __post_init__(self) -> None:
        _check(self.candidates >= 1 and self.eval_batches >= 1, "random: candidates and eval_batches must be >= 1")
