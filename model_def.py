"""Determined trials for geometry-aware weight-sharing NAS, a thin adapter over
``search_spaces/``, ``optimizers/`` and ``nas_data/``:

* ``SearchTrial``: supernet + architecture optimizer (GAEA, DARTS, GDAS, random search),
  bilevel or single-level; writes ``genotype.json`` with every checkpoint.
* ``RetrainTrial``: the discrete network of a genotype (name, string or genotype.json).

Cluster: ``python3 -m determined.launch.torch_distributed python3 model_def.py`` (the
experiment's entrypoint). Local, no cluster: ``python model_def.py experiments/<x>.yaml
[--set key=value ...] [--max-batches N] [--output DIR] [--resume DIR]``. A run with a
``genotype`` hyperparameter is a retraining, any other a search.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
from pathlib import Path
from typing import Any, Optional

import determined as det
import torch
import torch.nn.functional as F
from determined.pytorch import DataLoader, LRScheduler, PyTorchTrial, PyTorchTrialContext

import optimizers
import search_spaces
from nas_data import (DataConfig, EpochBatchSampler, ShardBatchSampler, build_retrain_data, build_search_data,
                      sample_indices)
from nas_trial.config import PRECISIONS, RetrainConfig, SearchConfig
from nas_trial.faults import Faults
from nas_trial.health import Health
from nas_trial.interrupt import INTERRUPT, StopOnInterrupt, ignore_in_workers
from nas_trial.observe import WARMUP_LABEL, Observer
from nas_trial.progress import Progress
from nas_trial.state import TrialState, resume_settings, run_name, write_json
from nas_trial.stopping import StopWhenMasterStops
from nas_trial.train_metrics import DeviceMeans
from nas_trial.validation import EveryRankValidation
from optimizers.search import search_step, unreachable_parameters, zero_touch
from search_spaces.nb201_benchmark import Benchmark, BenchmarkError


class _Trial(PyTorchTrial):
    """What both trials share: step counter, resumable training loader, progress lines,
    divergence checks, clean interrupts."""

    name = "trial"

    def _setup(self, context: PyTorchTrialContext, seed: int, epochs: int, n_train: int, advice: str) -> None:
        self.context = context
        self.rank, self.world = context.distributed.get_rank(), context.distributed.get_size()
        self.per_slot = context.get_per_slot_batch_size()
        if n_train < self.per_slot * self.world:
            raise ValueError(f"{n_train} training images cannot fill one global batch of "
                             f"{self.per_slot * self.world}; lower global_batch_size or use more data")
        self.epoch_len = EpochBatchSampler.steps_per_epoch(n_train, self.per_slot, self.world)  # on any rank count
        self.total_steps = epochs * self.epoch_len
        self.steps = 0                # batches trained (restored from checkpoints)
        self.last_metrics: dict[str, Any] = {}
        self.last_validation_step: Optional[int] = None     # the step last_metrics were measured at
        self.last_checkpoint: Optional[str] = None
        self.progress = Progress(self.name, self.total_steps, enabled=self.rank == 0)
        self.seed = seed
        self.observer = Observer(self)      # TensorBoard, history for the report, cost
        self.faults = Faults()              # NAS_FAULT_KILL (kill tests)
        self.health = Health(self, advice)
        self.validation = EveryRankValidation(self)     # every rank measures, the chief reports
        self.step_means = context.wrap_reducer(DeviceMeans(), for_validation=False)   # loss etc., on the device
        self.eval_batch_size = self.per_slot * self.world   # batches as one slot cuts them
        self.settings = resume_settings(context.get_hparams(), context.get_data_config())

    def _callbacks(self, write_files=None) -> dict[str, det.pytorch.PyTorchCallback]:
        # in this order: the observer stops the cost clock before validation starts
        callbacks = {"nas_state": TrialState(self, self.settings, write_files), "observe": self.observer,
                     "health": self.health, "validate": self.validation,
                     "master_stop": StopWhenMasterStops(self.context, self.name)}
        if self.world > 1:
            callbacks["interrupt"] = StopOnInterrupt(self.context)
        self.callbacks = callbacks
        return callbacks

    def checkpoint_state(self) -> dict[str, Any]:
        """The tensors Determined's next checkpoint will hold, under its keys (its ``_save``)."""
        ctx = self.context
        return {"models_state_dict": [m.state_dict() for m in ctx.models],
                "optimizers_state_dict": [o.state_dict() for o in ctx.optimizers],
                "callbacks": {name: cb.state_dict() for name, cb in getattr(self, "callbacks", {}).items()}}

    def _begin_step(self) -> None:
        """Before a training step: a local interrupt stops here, between steps (single process;
        under torchrun the ranks agree at the next reporting boundary)."""
        if INTERRUPT.requested and self.world == 1:
            raise det.pytorch._ShouldExit()

    def _end_step(self, finite: torch.Tensor, what: str, on_device: dict[str, Any],
                  numbers: dict[str, float]) -> dict[str, float]:
        """After a step: its device tensors go to ``step_means`` (no host sync); Determined
        gets the plain numbers."""
        self.steps += 1
        self.step_means.update(on_device)
        if self.faults.nan("loss", self.steps) and self.rank == self.world - 1:
            finite = torch.zeros_like(finite, dtype=torch.bool)
        if self.faults.nan("weight", self.steps):
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
        self.health.record(self.steps, what, finite)
        self.progress.step(self.steps, {**on_device, **numbers})
        self.faults.hit("step", self.steps)
        return numbers

    def _train_loader(self, dataset, num_workers: int) -> DataLoader:
        sampler = EpochBatchSampler(len(dataset), self.per_slot, seed=self.seed, world=self.world)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                          pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_in_workers)

    def eval_loader(self, dataset, num_workers: int, batch_sampler=None) -> torch.utils.data.DataLoader:
        """A plain torch DataLoader, built once by its user: its workers persist between
        validations (Determined's DataLoader builds a new torch one, new workers, per iteration).
        Its own generator: a new iterator draws its worker seed from it, not from the global RNG
        that training uses (drop path), which would then depend on how often one validated."""
        if batch_sampler is None:
            batch_sampler = ShardBatchSampler(len(dataset), self.eval_batch_size)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                           pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                                           persistent_workers=num_workers > 0)

    def build_validation_data_loader(self) -> DataLoader:
        # Determined wants one, and never iterates it: evaluate_full_dataset reads what
        # EveryRankValidation measured on every rank
        return DataLoader(self.validation_dataset(), batch_size=self.eval_batch_size)

    def validation_dataset(self):
        raise NotImplementedError

    def validate_on_chief(self) -> dict[str, dict[str, float]]:
        """Measurements only the chief takes (random search ranks its candidates), by set name."""
        return {}

    def rank_counts(self) -> dict[str, int]:
        """Counts every rank keeps, summed over the ranks at each validation (``measured["counts"]``)."""
        return {}

    def validation_sets(self) -> dict[str, tuple[Any, Any]]:
        """name -> (dataset, forward) that EveryRankValidation measures on every rank."""
        return {}

    @classmethod
    def check_settings(cls, hparams: dict[str, Any], data: dict[str, Any]) -> None:
        """Raise a one-line ValueError for a bad hyperparameter or data setting."""
        DataConfig.from_mapping(data)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def arch_snapshot(self) -> Optional[dict[str, Any]]:
        """Architecture weights as plain lists (searches only)."""
        return None

    def current_genotype(self) -> Optional[str]:
        """The cell as a genotype string; None while a search has no result yet."""
        raise NotImplementedError


class SearchTrial(_Trial):
    name = "search"

    @classmethod
    def check_settings(cls, hparams: dict[str, Any], data: dict[str, Any]) -> None:
        cfg = SearchConfig.from_hparams(hparams)
        if cfg.benchmark_settings is not None:
            Benchmark(cfg.benchmark_settings).open()       # a missing or unreadable file: one line, before the run
        if cfg.budget_settings is not None:                # a bad table or target: one line, before the run
            b = cfg.budget_settings
            if b.table is not None and not Path(b.table).is_absolute():   # from the project root, as the run reads it
                b = dataclasses.replace(b, table=str(Path(__file__).resolve().parent / b.table))
            ops = search_spaces.get_space(cfg.space).ops
            if cfg.space_args.get("exclude_none"):
                ops = tuple(op for op in ops if op != "none")
            b.cost_table(cfg.space, b.classes or 10, nodes=cfg.space_args.get("nodes", 4),
                         multiplier=cfg.space_args.get("multiplier", 4), op_names=ops)
        super().check_settings(hparams, data)

    def __init__(self, context: PyTorchTrialContext) -> None:
        cfg = self.cfg = SearchConfig.from_hparams(context.get_hparams())
        self.data_cfg = DataConfig.from_mapping(context.get_data_config())
        self.data = build_search_data(self.data_cfg, cfg.seed)
        # the benchmark's scores of the current cell, looked up by the chief at each validation
        self.benchmark = Benchmark(cfg.benchmark_settings) if cfg.benchmark_settings is not None else None
        self.benchmark_missing: set[str] = set()       # cells the file does not hold (said once each)
        self._setup(context, cfg.seed, cfg.epochs, len(self.data.paired),
                    advice=f"lower learning_rate (now {cfg.learning_rate}) or the architecture optimizer's lr, "
                           "or set grad_clip")
        torch.manual_seed(cfg.seed)
        try:
            supernet = search_spaces.create(cfg.space, num_classes=self.data.num_classes, **cfg.space_args)
        except ValueError as e:
            raise ValueError(f"space_args {cfg.space_args}: {e}") from None
        if self.world > 1:
            # Architecture parameters stay out of DDP's buckets: the architecture optimizer
            # averages their gradients itself, so the two steps need no requires_grad toggling.
            # (DDP builds its buckets from f"{module}.{param}" names, i.e. ".alphas_normal" for
            # parameters of the root module, but broadcasts by plain names: list both forms.)
            names = [n for n, _ in supernet.arch_named_parameters()]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                supernet, names + ["." + n for n in names if "." not in n])
        # Memory format before DDP wraps the supernet (its buckets follow the parameters' layout).
        self.supernet = optimizers.prepare_supernet(supernet, channels_last=cfg.channels_last, compile=cfg.compile,
                                                    device=context.device)
        self.model = context.wrap_model(supernet)
        budget = (optimizers.CostBudget.from_settings(cfg.budget_settings, supernet, self.data.num_classes,
                                                      device=context.device)
                  if cfg.budget_settings is not None else None)
        self.arch = optimizers.create(cfg.optimizer, supernet, cfg.arch_settings, seed=cfg.seed, budget=budget)
        self.w_opt = context.wrap_optimizer(torch.optim.SGD(
            supernet.weight_parameters(), lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
        self.lr_scheduler = context.wrap_lr_scheduler(
            torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, cfg.schedule_epochs or cfg.epochs,
                                                       cfg.min_learning_rate),
            step_mode=LRScheduler.StepMode.STEP_EVERY_EPOCH)

    def build_callbacks(self) -> dict[str, det.pytorch.PyTorchCallback]:
        return self._callbacks(self.write_genotype)

    def build_training_data_loader(self) -> DataLoader:
        return self._train_loader(self.data.paired, self.data_cfg.num_workers)

    def validation_dataset(self):
        return self.data.heldout

    def validation_sets(self) -> dict[str, tuple[Any, Any]]:
        if isinstance(self.arch, optimizers.RandomSearch):
            return {}           # ranks its candidates on the chief (evaluate_full_dataset)
        weights = self.arch.probabilities()
        return {"val": (self.data.heldout, lambda x: self.supernet(x, weights))}

    def _weight_step(self) -> None:
        clip = self.cfg.grad_clip
        self.context.step_optimizer(
            self.w_opt, clip_grads=(lambda params: torch.nn.utils.clip_grad_norm_(params, clip)) if clip else None)

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        self._begin_step()
        x, y, xv, yv = batch
        self.arch.set_progress(self.steps / max(self.total_steps - 1, 1))
        result = search_step(self.model, self.arch, x, y, xv, yv, bilevel=self.cfg.bilevel,
                             weight_backward=self.context.backward, weight_step=self._weight_step,
                             ddp_unused=self.arch.sampled and self.world > 1,
                             autocast=PRECISIONS[self.cfg.precision],
                             update_arch=self.steps >= self.cfg.arch_warmup_epochs * self.epoch_len,
                             check_finite=False)
        return self._end_step(result.finite, "the training loss, the architecture loss or an architecture gradient",
                              {"loss": result.loss, "train_accuracy": result.accuracy, "arch_loss": result.arch_loss},
                              {"lr": self.w_opt.param_groups[0]["lr"]})

    def random_search_sample(self) -> torch.utils.data.Subset:
        """The held-out images random search scores its candidates on: ``eval_batches`` batches
        of the global batch size, as one slot cuts them, on any number of slots. A seeded
        sample, the same at every validation: the held-out half is stored class by class, and
        its first batches would all be one class."""
        n = min(self.arch.settings.eval_batches * self.eval_batch_size, len(self.data.heldout))
        return torch.utils.data.Subset(self.data.heldout, sample_indices(len(self.data.heldout), n, self.seed))

    def validate_on_chief(self) -> dict[str, dict[str, float]]:
        if not isinstance(self.arch, optimizers.RandomSearch):
            return {}
        batches = [self.context.to_device(b) for b in self.eval_loader(self.random_search_sample(), 0)]
        results = self.arch.select(self.supernet, batches)
        best = self.arch.best
        return {"val": {"loss": best["loss"], "accuracy": best["accuracy"], "candidates": len(results),
                        "images": sum(len(y) for _, y in batches)}}

    def evaluate_full_dataset(self, data_loader: torch.utils.data.DataLoader) -> dict[str, Any]:
        m = self.validation.measured["val"]       # measured before this call, data_loader unused
        metrics = {"val_loss": m["loss"], "val_accuracy": m["accuracy"], "val_images": m["images"]}
        if "candidates" in m:
            metrics["candidates"] = m["candidates"]
        metrics.update(optimizers.entropy_stats(self.arch.probabilities()))
        genotype = self.current_genotype()
        metrics["genotype"] = genotype or WARMUP_LABEL
        if genotype is not None and self.benchmark is not None:
            metrics.update(self.benchmark_scores(genotype))
        metrics.update(self.budget_metrics())
        metrics.update(self.observer.cost.metrics(self.steps))
        self.last_validation_step = self.steps
        self.progress.validation(self.steps, metrics)
        return metrics

    def extra_state(self) -> dict[str, Any]:
        return {"arch": self.arch.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.arch.load_state_dict(state["arch"])

    def architecture_untouched(self) -> bool:
        """Still in the weights-only warm-up: the architecture weights have not had a step, so
        their argmax is a tie (every NAS-Bench-201 edge ``skip_connect``, the benchmark's
        collapse cell) that must not pass for a result. Random search ranks real candidates."""
        return (self.cfg.arch_warmup_epochs > 0 and not isinstance(self.arch, optimizers.RandomSearch)
                and self.steps <= self.cfg.arch_warmup_epochs * self.epoch_len)

    def current_genotype(self) -> Optional[str]:
        """The cell the search holds, or None during the weights-only warm-up."""
        return None if self.architecture_untouched() else self.arch.genotype().to_str()

    def benchmark_scores(self, genotype: str) -> dict[str, float]:
        """``benchmark_test_accuracy`` (and ``benchmark_valid_accuracy``) of the cell, in percent;
        nothing for a cell the benchmark file does not hold (said once per cell)."""
        try:
            return self.benchmark.score(genotype).metrics()
        except BenchmarkError as e:
            if genotype not in self.benchmark_missing:
                self.benchmark_missing.add(genotype)
                print(f"[{self.name}] warning: {e}; no benchmark score for it", file=sys.stderr, flush=True)
            return {}

    def budget_metrics(self) -> dict[str, Any]:
        """Under a budget: ``budget_cell`` (the cost of the cell the search returns, in the target
        network), ``budget_target``, and for the learning optimizers ``budget_rule_cell`` (the
        genotype rule's cell before the repair that keeps the returned one within the target),
        ``budget_expected`` (under the architecture distribution) and ``budget_multiplier``."""
        b = self.arch.budget
        if b is None:
            return {}
        metrics = b.metrics(self.arch.probabilities()) if self.arch.learns else {"budget_target": b.target}
        metrics["budget_cell"] = b.table.cost(self.arch.genotype())
        return metrics

    def budget_record(self, genotype: Any) -> dict[str, Any]:
        """What genotype.json says of the cell against the budget."""
        b = self.arch.budget
        cost = b.table.cost(genotype)
        rule = self.supernet.genotype(self.arch.probabilities()) if self.arch.learns else genotype
        return {"metric": b.table.metric, "target": b.target, "cell": cost, "within": cost <= b.target,
                "rule_cell": b.table.cost(rule), "repaired": rule.canonical() != genotype.canonical(),
                "network": b.table.network.describe(), "multiplier": float(b.multiplier),
                **({"table": self.cfg.budget_settings.table, "measured": b.table.measured}
                   if b.table.metric == "latency_ms" else {})}

    def arch_snapshot(self) -> dict[str, Any]:
        """Per cell type, the op weights (edges x ops) and, with edge normalization, the per-node
        edge weights; for sampled methods (GDAS, random) the sampling probabilities."""
        return {"space": self.supernet.space, "op_names": list(self.supernet.op_names), "sampled": self.arch.sampled,
                "cells": {ct: {"ops": cw.ops.cpu().tolist(),
                               "edges": [e.cpu().tolist() for e in cw.edges] if cw.edges is not None else None}
                          for ct, cw in self.arch.probabilities().items()}}

    def write_genotype(self, checkpoint_dir: Path) -> None:
        """``genotype.json`` beside the checkpoint: what a retraining reads."""
        genotype = self.arch.genotype()
        run = run_name(checkpoint_dir)
        extra: dict[str, Any] = {}
        if self.architecture_untouched():
            extra["warmup"] = ("the architecture weights are untouched (arch_warmup_epochs): this genotype is the "
                               "argmax of a tie, not a search result")
        if self.benchmark is not None:
            s = self.benchmark.settings
            extra["benchmark"] = {"file": str(self.benchmark.path), "format": self.benchmark.kind,
                                  "dataset": s.dataset, "epochs": s.epochs,
                                  **({} if extra.get("warmup") else self.benchmark_scores(genotype.to_str()))}
        if self.arch.budget is not None:
            extra["budget"] = self.budget_record(genotype)
        write_json(checkpoint_dir / "genotype.json", {
            **genotype.to_json(), **extra, "step": self.steps, "epoch": self.steps / self.epoch_len,
            "optimizer": self.cfg.optimizer, "seed": self.cfg.seed, "op_names": list(self.supernet.op_names),
            "run": run, "validation_step": self.last_validation_step,
            "arch_weights": self.arch_snapshot()["cells"], "cost": self.observer.cost.totals(self.steps),
            "metrics": {k: v for k, v in self.last_metrics.items()},
            "dataset": self.data_cfg.dataset})


class RetrainTrial(_Trial):
    name = "retrain"

    @classmethod
    def check_settings(cls, hparams: dict[str, Any], data: dict[str, Any]) -> None:
        raw = RetrainConfig.from_hparams(hparams)
        raw.resolve(search_spaces.parse_genotype(raw.genotype, space=raw.space).space)
        super().check_settings(hparams, data)

    def __init__(self, context: PyTorchTrialContext) -> None:
        raw = RetrainConfig.from_hparams(context.get_hparams())
        self.genotype = search_spaces.parse_genotype(raw.genotype, space=raw.space)
        cfg = self.cfg = raw.resolve(self.genotype.space)
        self.data_cfg = DataConfig.from_mapping(context.get_data_config())
        self.data = build_retrain_data(self.data_cfg, cfg.seed, cutout=cfg.cutout)
        self._setup(context, cfg.seed, cfg.epochs, len(self.data.train),
                    advice=f"lower learning_rate (now {cfg.learning_rate}) or set grad_clip")
        torch.manual_seed(cfg.seed)
        # an auxiliary head whose loss weighs 0 would be trained by nothing (and idle under DDP)
        net = search_spaces.create_network(self.genotype, C=cfg.init_channels, layers=cfg.layers,
                                           num_classes=self.data.num_classes,
                                           auxiliary=bool(cfg.auxiliary and cfg.auxiliary_weight), variant=cfg.variant)
        self.unused: Optional[list[torch.nn.Parameter]] = None   # under DDP: parameters no loss reaches
        c, h, w = self.data.image_shape
        # the auxiliary head pools 5x5 windows (stride 3; ImageNet: 2) from features 1/4 (ImageNet: 1/32) of the
        # image size, then a 2x2 convolution: the features need 8 (ImageNet: 7) pixels
        shrink, need = (4, 8) if cfg.variant == "cifar" else (32, 7)
        if self.genotype.space == "darts" and cfg.auxiliary and cfg.auxiliary_weight and -(-min(h, w) // shrink) < need:
            raise ValueError(f"auxiliary: the auxiliary head needs features of at least {need}x{need} pixels, 1/{shrink} "
                             f"of the image size, and these images are {h}x{w}; set auxiliary: false (images under "
                             f"{shrink * (need - 1) + 1} px)")
        self.candidate = cfg.candidate_metrics(self.genotype)
        self.size = {"params": search_spaces.count_parameters(net),
                     "params_with_auxiliary": search_spaces.count_parameters(net, include_auxiliary=True),
                     "macs": search_spaces.count_macs(net, (1, c, h, w))}
        if hasattr(net, "drop_path_enabled"):   # fixed for the run: the forward's control flow stays static
            net.drop_path_enabled = cfg.drop_path_prob > 0
        # speed options, before DDP wraps the network (its buckets follow the parameters' layout)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        optimizers.prepare_supernet(net, channels_last=cfg.channels_last, compile=cfg.compile)
        if context.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        self.autocast = PRECISIONS[cfg.precision]
        self.net = net
        self.model = context.wrap_model(net)
        self.opt = context.wrap_optimizer(torch.optim.SGD(
            net.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov))
        self.lr_scheduler = context.wrap_lr_scheduler(lr_schedule(self.opt, cfg),
                                                      step_mode=LRScheduler.StepMode.STEP_EVERY_EPOCH)
        # weight EMA (torch's AveragedModel, BatchNorm statistics averaged too), evaluated beside the raw weights
        self.ema = None
        if cfg.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True).eval()

    def build_callbacks(self) -> dict[str, det.pytorch.PyTorchCallback]:
        return self._callbacks()

    def extra_state(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    def rank_counts(self) -> dict[str, int]:
        return {"skipped_images": sum(int(d.skipped) for d in (self.data.train, self.data.val, self.data.test)
                                      if hasattr(d, "skipped"))} if self.data_cfg.streamed else {}

    def current_genotype(self) -> str:
        return self.genotype.to_str()

    def build_training_data_loader(self) -> DataLoader:
        return self._train_loader(self.data.train, self.data_cfg.num_workers)

    def validation_dataset(self):
        return self.data.val

    def _precision(self):
        """The forward's autocast (``precision: bf16``), or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.context.device.type, dtype=self.autocast)

    def validation_sets(self) -> dict[str, tuple[Any, Any]]:
        def forward(x, net=self.net):
            with self._precision():
                return net(x.contiguous(memory_format=self.memory_format))[0]
        sets = {"val": (self.data.val, forward), "test": (self.data.test, forward)}
        if self.ema is not None:
            ema = functools.partial(forward, net=self.ema.module)
            sets.update(val_ema=(self.data.val, ema), test_ema=(self.data.test, ema))
        return sets

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        self._begin_step()
        cfg = self.cfg
        x, y = batch
        # drop path ramps linearly from 0 over the run (by our own step count: resume-safe)
        self.net.drop_path_prob = cfg.drop_path_prob * (self.steps // self.epoch_len) / cfg.epochs
        with self._precision():
            logits, aux = self.model(x.contiguous(memory_format=self.memory_format))
        logits = logits.float()
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        if aux is not None and cfg.auxiliary_weight:
            loss = loss + cfg.auxiliary_weight * F.cross_entropy(aux.float(), y, label_smoothing=cfg.label_smoothing)
        if self.world > 1 and self.unused is None:
            # e.g. a cell with no edge from its first input: DDP (find_unused_parameters=False)
            # needs a gradient for every parameter; the set is fixed by the genotype
            self.unused = unreachable_parameters(loss, list(self.net.parameters()))
        self.context.backward(zero_touch(loss, self.unused) if self.unused else loss)
        for p in self.unused or []:
            p.grad = None       # the single-process update: no gradient, no weight decay
        clip = cfg.grad_clip
        self.context.step_optimizer(
            self.opt, clip_grads=(lambda params: torch.nn.utils.clip_grad_norm_(params, clip)) if clip else None)
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        return self._end_step(torch.isfinite(loss.detach()), "the training loss",
                              {"loss": loss.detach(), "train_accuracy": (logits.argmax(-1) == y).float().mean()},
                              {"lr": self.opt.param_groups[0]["lr"], "drop_path_prob": self.net.drop_path_prob})

    def evaluate_full_dataset(self, data_loader: torch.utils.data.DataLoader) -> dict[str, Any]:
        measured = self.validation.measured       # on every rank
        val, test = measured["val"], measured["test"]
        metrics = {"val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_top5_accuracy": val["top5_accuracy"],
                   "val_images": val["images"], "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                   "test_top5_accuracy": test["top5_accuracy"], **self.size, "genotype": self.genotype.to_str(),
                   **self.candidate, **measured.get("counts", {}), **self.observer.cost.metrics(self.steps)}
        for name in ("val_ema", "test_ema"):
            if name in measured:
                metrics.update({f"{name}_loss": measured[name]["loss"], f"{name}_accuracy": measured[name]["accuracy"],
                                f"{name}_top5_accuracy": measured[name]["top5_accuracy"]})
        self.progress.validation(self.steps, metrics)
        return metrics


def lr_schedule(opt: torch.optim.Optimizer, cfg: RetrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per epoch: ``warmup_epochs`` of linear warm-up (epoch e at (e + 1) / warmup of the rate),
    then cosine or linear decay to ``min_learning_rate`` over the other epochs. Without warm-up,
    cosine is torch's CosineAnnealingLR."""
    lr, low, warm, epochs = cfg.learning_rate, cfg.min_learning_rate, cfg.warmup_epochs, cfg.epochs
    if not warm and cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, low)

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / warm
        p = min((epoch - warm) / max(epochs - warm, 1), 1.0)
        decayed = 0.5 * (1 + math.cos(math.pi * p)) if cfg.lr_schedule == "cosine" else 1.0 - p
        return (low + (lr - low) * decayed) / lr

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def trial_class(hparams: dict[str, Any]) -> type[_Trial]:
    """A ``genotype`` hyperparameter makes a retraining; anything else is a search."""
    return RetrainTrial if "genotype" in hparams else SearchTrial


if __name__ == "__main__":
    from nas_trial.runner import main

    sys.exit(main(sys.argv[1:], trial_class))
