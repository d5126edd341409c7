"""Typed, validated settings for architecture optimizers: built from plain dicts (YAML
hyperparameters), where a misspelt key is an error that lists the valid ones."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, what: str) -> T:
    """Build dataclass ``cls`` from ``values``: unknown keys and values of the wrong type are errors."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(map(repr, unknown))} for {what}; "
                         f"valid settings: {', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(value, hints[key], f"{what} setting {key!r}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what} must be a number, got {value!r}"
                             + (" (write floats like 1.0e-3: YAML 1.1 reads 1e-3 as a string)" if isinstance(value, str) else ""))
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{what} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{what} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{what} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, what) for v, a in zip(value, args))
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and type(None) in typing.get_args(hint):
            return None
        return _coerce(value, args[0], what)
    return value


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


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
