"""Trial hyperparameters as frozen dataclasses: a misspelt key or a value of the wrong type
is a one-line error that says what is valid."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

import optimizers
import search_spaces
from nas_settings import from_mapping
from search_spaces.nb201_benchmark import BenchmarkSettings, settings_from

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

# Parameters of the supernets that come from elsewhere (the data) or are not for users.
_DERIVED = {"num_classes", "in_channels", "self"}


def _check_space_args(space: str, args: Mapping[str, Any]) -> None:
    cls = search_spaces.get_space(space).supernet
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in _DERIVED]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"unknown space_args {', '.join(map(repr, unknown))} for search space {space!r}; "
                         f"valid space_args: {', '.join(valid)}")


@dataclass(frozen=True)
class SearchConfig:
    """Hyperparameters of a search (``SearchTrial``)."""
    global_batch_size: int = 64               # per step, over all slots (each slot gets its share)
    space: str = "darts"                      # darts | nas-bench-201
    space_args: dict = field(default_factory=dict)        # supernet arguments (C, layers, partial_channels, ...)
    optimizer: str = "gaea"                   # gaea | darts | gdas | gaea_gdas | random
    optimizer_args: dict = field(default_factory=dict)    # per optimizer name: its settings
    bilevel: bool = True                      # architecture step on held-out batches; else single-level
    learning_rate: float = 0.025              # weights: SGD, cosine-annealed per epoch ...
    min_learning_rate: float = 0.001          # ... down to this
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0                    # weight-gradient norm clip (0 disables)
    epochs: int = 50
    schedule_epochs: Optional[int] = None     # cosine period in epochs, >= epochs (null: epochs); a longer one
                                              # stops part-way down, as the reference NAS-Bench-201 search does
    arch_warmup_epochs: int = 0               # epochs of weight training before the architecture moves (PC-DARTS: 15)
    seed: int = 0
    validate_every: int = 1                   # epochs between validations (cluster runs)
    checkpoint_every: int = 1                 # epochs between checkpoints (cluster runs)
    precision: str = "fp32"                   # fp32 | bf16 (autocast: changes numerics, on request only)
    channels_last: Optional[bool] = None      # memory format (same math); null: the space's choice for the device
    compile: bool = False                     # torch.compile the supernet's forward (same math)
    benchmark: Optional[dict] = None          # NAS-Bench-201: {file, dataset, epochs}; the benchmark's accuracy of
                                              # the cell at every validation (search_spaces/nb201_benchmark.py)
    budget: Optional[dict] = None             # {metric: params|macs|latency_ms, target, ...}: the cell's cost in
                                              # the retrained network stays within target (optimizers/budget.py)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> "SearchConfig":
        return from_mapping(cls, hparams, "a search (hyperparameters)")

    @property
    def benchmark_settings(self) -> Optional[BenchmarkSettings]:
        return settings_from(self.benchmark)

    @property
    def budget_settings(self) -> Optional[optimizers.BudgetSettings]:
        if self.budget is None:
            return None
        if not isinstance(self.budget, dict):
            raise ValueError(f"budget must be a mapping {{metric, target, ...}}, got {self.budget!r}")
        missing = [k for k in ("metric", "target") if k not in self.budget]
        if missing:
            raise ValueError(f"budget needs {' and '.join(missing)} (e.g. budget: {{metric: params, target: 2.5e6}})")
        return from_mapping(optimizers.BudgetSettings, self.budget, "budget")

    def __post_init__(self) -> None:
        search_spaces.get_space(self.space)
        optimizers.get(self.optimizer)
        if not isinstance(self.space_args, dict) or not isinstance(self.optimizer_args, dict):
            raise ValueError("space_args and optimizer_args must be mappings")
        _check_space_args(self.space, self.space_args)
        unknown = sorted(set(self.optimizer_args) - set(optimizers.names()))
        if unknown:
            raise ValueError(f"optimizer_args is keyed by optimizer name; unknown {', '.join(map(repr, unknown))}; "
                             f"valid names: {', '.join(optimizers.names())}")
        for name, settings in self.optimizer_args.items():  # validate every entry, not only the one in use
            from_mapping(optimizers.get(name).Settings, settings, f"architecture optimizer {name!r}")
        if self.global_batch_size < 1 or self.epochs < 1 or self.validate_every < 1 or self.checkpoint_every < 1:
            raise ValueError("global_batch_size, epochs, validate_every and checkpoint_every must be >= 1")
        if self.schedule_epochs is not None and self.schedule_epochs < self.epochs:
            raise ValueError(f"schedule_epochs must be >= epochs ({self.epochs}) or null, got {self.schedule_epochs}")
        if not 0 <= self.arch_warmup_epochs < self.epochs:
            raise ValueError(f"arch_warmup_epochs must be in [0, epochs) = [0, {self.epochs}), "
                             f"got {self.arch_warmup_epochs}")
        if self.learning_rate <= 0 or self.min_learning_rate < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be > 0; min_learning_rate, grad_clip and weight_decay >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.benchmark is not None:
            if self.space != "nas-bench-201":
                raise ValueError(f"benchmark scores NAS-Bench-201 cells, and this search's space is {self.space!r}; "
                                 "remove benchmark or search space nas-bench-201")
            settings_from(self.benchmark)
        self.budget_settings   # noqa: B018  (validates)

    @property
    def arch_settings(self) -> Mapping[str, Any]:
        return self.optimizer_args.get(self.optimizer, {})


# Retraining defaults: the DARTS CIFAR protocol, the DARTS-space ImageNet one (the mobile
# setting as PC-DARTS and GAEA train it, and Determined's GAEA ImageNet example: batch 1024 at
# lr 0.5, scaled linearly with the batch; 250 epochs, 5 of linear warm-up, then linear decay;
# label smoothing 0.1; weight decay 3e-5), and the NAS-Bench-201 one.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "darts": dict(init_channels=36, layers=20, auxiliary=True, auxiliary_weight=0.4, drop_path_prob=0.2, cutout=16,
                  learning_rate=0.025, min_learning_rate=0.0, momentum=0.9, nesterov=False, weight_decay=3e-4,
                  grad_clip=5.0, epochs=600, label_smoothing=0.0, warmup_epochs=0, lr_schedule="cosine",
                  ema_decay=0.0),
    "darts-imagenet": dict(init_channels=48, layers=14, auxiliary=True, auxiliary_weight=0.4, drop_path_prob=0.0,
                           cutout=0, learning_rate=None, min_learning_rate=0.0, momentum=0.9, nesterov=False,
                           weight_decay=3e-5, grad_clip=5.0, epochs=250, label_smoothing=0.1, warmup_epochs=5,
                           lr_schedule="linear", ema_decay=0.0),
    "nas-bench-201": dict(init_channels=16, layers=5, auxiliary=False, auxiliary_weight=0.0, drop_path_prob=0.0,
                          cutout=0, learning_rate=0.1, min_learning_rate=0.0, momentum=0.9, nesterov=True,
                          weight_decay=5e-4, grad_clip=0.0, epochs=200, label_smoothing=0.0, warmup_epochs=0,
                          lr_schedule="cosine", ema_decay=0.0),
}
IMAGENET_LR_PER_1024 = 0.5      # darts-imagenet: learning_rate = 0.5 * global_batch_size / 1024 unless set
LR_SCHEDULES = ("cosine", "linear")


@dataclass(frozen=True)
class RetrainConfig:
    """Hyperparameters of a retraining (``RetrainTrial``); unset values follow the protocol of
    the genotype's search space (``PROTOCOLS``)."""
    genotype: str                              # published name, genotype string, or genotype.json path
    space: Optional[str] = None                # when set, the genotype must belong to this search space
    global_batch_size: int = 96
    init_channels: Optional[int] = None
    layers: Optional[int] = None               # cells (darts) or cells per stage (nas-bench-201)
    auxiliary: Optional[bool] = None
    auxiliary_weight: Optional[float] = None
    drop_path_prob: Optional[float] = None     # ramped linearly from 0 over the run
    cutout: Optional[int] = None               # cutout length in pixels (0 disables)
    learning_rate: Optional[float] = None
    min_learning_rate: Optional[float] = None
    momentum: Optional[float] = None
    nesterov: Optional[bool] = None
    weight_decay: Optional[float] = None
    grad_clip: Optional[float] = None
    epochs: Optional[int] = None
    variant: str = "cifar"                     # darts networks: cifar | imagenet
    seed: int = 0
    validate_every: int = 1
    checkpoint_every: int = 10
    candidates: Optional[list] = None          # provenance of the cells a candidates experiment retrains
    precision: str = "fp32"                    # fp32 | bf16 (autocast, training and validation: changes numerics)
    channels_last: bool = False                # memory format of the network and its input (same math)
    compile: bool = False                      # torch.compile the network (same math)
    cudnn_benchmark: bool = False              # CUDA: cuDNN times its kernels and keeps the fastest (not bitwise
                                               # reproducible from run to run)
    label_smoothing: Optional[float] = None    # of the training loss (torch's cross_entropy label_smoothing)
    warmup_epochs: Optional[int] = None        # linear learning-rate warm-up, then lr_schedule's decay (unset: the
                                               # protocol's, at most half of epochs)
    lr_schedule: Optional[str] = None          # cosine | linear: decay to min_learning_rate over the other epochs
    ema_decay: Optional[float] = None          # > 0: an exponential moving average of the weights
                                               # (torch's AveragedModel), evaluated beside the raw weights

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> "RetrainConfig":
        if "genotype" not in hparams:
            raise ValueError("a retraining needs the 'genotype' hyperparameter (published name, genotype string, "
                             "or genotype.json path)")
        return from_mapping(cls, hparams, "a retraining (hyperparameters)")

    def resolve(self, space: str) -> "RetrainConfig":
        """Fill unset values from the protocol of ``space`` (and ``variant``)."""
        protocol = PROTOCOLS["darts-imagenet" if space == "darts" and self.variant == "imagenet" else space]
        values = {k: (protocol[k] if v is None and k in protocol else v) for k, v in self.__dict__.items()}
        if values["learning_rate"] is None:
            values["learning_rate"] = IMAGENET_LR_PER_1024 * self.global_batch_size / 1024
        if self.warmup_epochs is None and values["epochs"] is not None:     # a short run warms up half of it at most
            values["warmup_epochs"] = min(values["warmup_epochs"], values["epochs"] // 2)
        values["space"] = space
        cfg = RetrainConfig(**values)
        if cfg.init_channels < 1 or cfg.layers < 1:
            raise ValueError(f"init_channels and layers must be >= 1, got {cfg.init_channels} and {cfg.layers}")
        if cfg.epochs < 1 or cfg.global_batch_size < 1 or cfg.learning_rate <= 0:
            raise ValueError("epochs and global_batch_size must be >= 1 and learning_rate > 0")
        if not 0.0 <= cfg.drop_path_prob < 1.0:
            raise ValueError(f"drop_path_prob must be in [0, 1), got {cfg.drop_path_prob}")
        if cfg.cutout < 0 or cfg.weight_decay < 0 or cfg.grad_clip < 0 or cfg.auxiliary_weight < 0:
            raise ValueError("cutout, weight_decay, grad_clip and auxiliary_weight must be >= 0")
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {cfg.precision!r}; valid: {', '.join(PRECISIONS)}")
        if cfg.variant not in ("cifar", "imagenet"):
            raise ValueError(f"unknown variant {cfg.variant!r}; valid variants: cifar, imagenet")
        if not 0.0 <= cfg.label_smoothing < 1.0 or not 0.0 <= cfg.ema_decay < 1.0:
            raise ValueError(f"label_smoothing and ema_decay must be in [0, 1), got {cfg.label_smoothing} and "
                             f"{cfg.ema_decay}")
        if not 0 <= cfg.warmup_epochs < cfg.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs) = [0, {cfg.epochs}), got {cfg.warmup_epochs}")
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        if cfg.candidates is not None and not (isinstance(cfg.candidates, list) and all(
                isinstance(c, dict) and isinstance(c.get("genotype"), str) for c in cfg.candidates)):
            raise ValueError("candidates must be a list of mappings with a 'genotype' string each, as "
                             "`python -m nas_trial candidates` writes them")
        return cfg

    def candidate_metrics(self, genotype: Any) -> dict[str, Any]:
        """Where the trained cell came from (``candidate_*`` metrics), when ``candidates`` lists it."""
        key = genotype.canonical().to_str()
        for c in self.candidates or []:
            if search_spaces.parse_genotype(c["genotype"]).canonical().to_str() == key:
                return {f"candidate_{k}": v for k, v in c.items() if k != "genotype"}
        return {}
