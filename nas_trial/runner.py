"""Run a trial locally through Determined's Trainer API (CPU or GPU, one process or
``torchrun``), or on a cluster as the experiment's entrypoint.

Local runs resume exactly: the trial's sampler skips the batches a checkpoint had trained
(Determined 0.38 restarts its counter at 0 off-cluster), and the reporting period is chosen
to divide the remaining batches, so training stops at exactly the requested total.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHORT_SEARCH_STEPS = 1000   # below this many steps the report explains what a short search shows
USAGE = "python model_def.py experiments/<x>.yaml [--set key=value ...] [--max-batches N] [--output DIR] [--resume DIR]"


class _Yaml11Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float like the master's YAML 1.1 does."""


_Yaml11Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            config = yaml.load(f, Loader=_Yaml11Loader)
    except FileNotFoundError:
        raise ValueError(f"experiment config {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"experiment config {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("hyperparameters"), dict):
        raise ValueError(f"experiment config {str(path)!r} needs a 'hyperparameters' mapping")
    return config


TOP_LEVEL = {"data", "hyperparameters", "searcher", "resources", "environment", "checkpoint_storage",
             "name", "description", "entrypoint", "max_restarts", "min_checkpoint_period", "bind_mounts",
             "checkpoint_policy", "reproducibility", "labels", "workspace", "project"}


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key=value`` (value read as YAML); dotted keys; a key outside the experiment config's
    top-level sections is a hyperparameter (``--set optimizer=darts`` = ``hyperparameters.optimizer``)."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        path = key.split(".")
        if path[0] not in TOP_LEVEL:
            path = ["hyperparameters", *path]
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part!r} is not a mapping")
        node[path[-1]] = yaml.load(raw, Loader=_Yaml11Loader)
    return config


def pick_hparams(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One concrete point of a Determined hyperparameter space for a local run: consts as
    they are, the first categorical value, the middle of int/double ranges, the geometric
    middle of log ranges."""
    out = {}
    for name, value in spec.items():
        if isinstance(value, Mapping) and "type" in value:
            kind = value["type"]
            if kind == "const":
                out[name] = value["val"]
            elif kind == "categorical":
                out[name] = value["vals"][0]
            elif kind == "int":
                out[name] = (value["minval"] + value["maxval"]) // 2
            elif kind == "double":
                out[name] = (value["minval"] + value["maxval"]) / 2
            elif kind == "log":
                out[name] = float(value.get("base", 10.0)) ** ((value["minval"] + value["maxval"]) / 2)
            else:
                raise ValueError(f"hyperparameter {name!r} has unknown type {kind!r}")
        elif isinstance(value, Mapping):
            out[name] = pick_hparams(value)
        else:
            out[name] = value
    return out


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python model_def.py", usage=USAGE,
                                description="Run a search or retraining locally through Determined's Trainer API.")
    p.add_argument("config", help="experiment YAML (experiments/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter (or data.x, searcher.x, ...); repeatable")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop after this many batches in total (a resumed run continues to the same total)")
    p.add_argument("--output", default=None, help="directory for checkpoints (default ~/nas-runs/<name>-<time>)")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument("--validate-every", type=int, default=None, help="batches between validations (default: per epoch)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="batches between checkpoints")
    return p.parse_args(argv)


def _init_distributed():
    """Under torchrun: one gloo (CPU) or NCCL (GPU) process group, wrapped for Determined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import determined as det
    import torch
    import torch.distributed as dist

    os.environ["USE_TORCH_DISTRIBUTED"] = "1"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return det.core.DistributedContext.from_torch_distributed()


def run_local(args: argparse.Namespace, trial_class: Callable) -> int:
    import determined as det
    import torch

    from .report import write_report
    from .state import checkpoint_batches

    config = apply_overrides(load_config(args.config), args.overrides)
    data = config.get("data") or {}
    for key in ("root", "cache_dir"):  # paths given on the command line are relative to the caller's cwd
        if any(o.startswith(f"data.{key}=") for o in args.overrides) and data.get(key):
            data[key] = str(Path(data[key]).expanduser().resolve())
    hparams = pick_hparams(config["hyperparameters"])
    name = config.get("name") or Path(args.config).stem
    output = Path(args.output or Path.home() / "nas-runs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    output = output.expanduser().resolve()
    latest = str(Path(args.resume).expanduser().resolve()) if args.resume else None
    done = checkpoint_batches(latest) if latest else 0
    output.mkdir(parents=True, exist_ok=True)
    # Determined keeps local checkpoints under $XDG_DATA_HOME/determined: put them in --output.
    os.environ["XDG_DATA_HOME"] = str(output)
    # Run from the project root, as on a cluster: relative data paths resolve from there, and
    # the code copy in each checkpoint is the project (filtered by .detignore), not the caller's cwd.
    os.chdir(PROJECT_ROOT)
    torch.set_flush_denormal(True)
    distributed = _init_distributed()
    rank = distributed.get_rank() if distributed else 0
    if distributed and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // distributed.get_size()))

    # Tensorboard off locally: Determined would write it to ./runs (metrics are printed instead).
    with det.pytorch.init(hparams=hparams, exp_conf=config, distributed=distributed,
                          enable_tensorboard_logging=False) as context:
        trial = trial_class(hparams)(context)
        trial.observer.run_dir = output          # TensorBoard event files under --output
        total = trial.total_steps if args.max_batches is None else args.max_batches
        remaining = total - done
        if remaining <= 0:
            print(f"nothing to do: the checkpoint already has {done} of {total} batches", flush=True)
            return 0
        trial.progress.total = total
        epoch_len = trial.epoch_len
        validate = args.validate_every or epoch_len * trial.cfg.validate_every
        ckpt = args.checkpoint_every or epoch_len * trial.cfg.checkpoint_every
        if rank == 0:
            print(f"[{trial.name}] {type(trial).__name__}: {total} batches ({epoch_len} per epoch, "
                  f"{trial.per_slot} per slot x {trial.world} slot(s)); checkpoints under {output}"
                  + (f"; resuming at batch {done}" if done else ""), flush=True)
            print(f"[{trial.name}] hyperparameters: {hparams}", flush=True)
        det.pytorch.Trainer(trial, context).fit(
            max_length=det.pytorch.Batch(total),
            # a period dividing the remaining batches makes the loop stop at exactly `total`
            reporting_period=det.pytorch.Batch(math.gcd(remaining, 50)),
            validation_period=det.pytorch.Batch(validate),
            checkpoint_period=det.pytorch.Batch(ckpt),
            latest_checkpoint=latest)
        if rank == 0:
            print(f"[{trial.name}] finished at batch {trial.steps}; last checkpoint: {trial.last_checkpoint}", flush=True)
            if trial.last_checkpoint and (Path(trial.last_checkpoint) / "genotype.json").exists():
                print(f"[{trial.name}] genotype: {trial.current_genotype()}", flush=True)
                print(f"[{trial.name}] genotype.json: {Path(trial.last_checkpoint) / 'genotype.json'}", flush=True)
            report = write_report(output, trial.name, trial.observer.history, trial.current_genotype(),
                                  trial.observer.cost.totals(trial.steps), name,
                                  short_search=trial.steps < SHORT_SEARCH_STEPS)
            print(f"[{trial.name}] report: {report}  (TensorBoard: tensorboard --logdir {output / 'tensorboard'})",
                  flush=True)
    return 0


def run_cluster(info: Any, trial_class: Callable) -> int:
    import determined as det

    hparams = info.trial.hparams
    with det.pytorch.init(hparams=hparams) as context:
        trial = trial_class(hparams)(context)
        searcher = context.get_experiment_config().get("searcher", {})
        unit = {"batches": det.pytorch.Batch, "epochs": det.pytorch.Epoch}.get(searcher.get("time_metric"))
        max_length = unit(searcher["max_time"]) if unit and searcher.get("max_time") else det.pytorch.Epoch(trial.cfg.epochs)
        det.pytorch.Trainer(trial, context).fit(
            max_length=max_length, latest_checkpoint=info.latest_checkpoint,
            validation_period=det.pytorch.Epoch(trial.cfg.validate_every),
            checkpoint_period=det.pytorch.Epoch(trial.cfg.checkpoint_every))
    return 0


def main(argv: list[str], trial_class: Callable) -> int:
    # Determined 0.38 restores checkpoints (numpy RNG state included) with a plain torch.load,
    # which torch >= 2.6 refuses unless weights-only loading is turned off.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import determined as det

    from nas_data import DataError
    from optimizers.search import NonFiniteLossError
    from search_spaces import GenotypeError

    info = det.get_cluster_info()
    try:
        if info is not None and info.task_type == "TRIAL":
            return run_cluster(info, trial_class)
        return run_local(_parse(argv), trial_class)
    except (ValueError, TypeError, GenotypeError, DataError, FileNotFoundError, NonFiniteLossError) as e:
        if isinstance(e, TypeError) and "unexpected keyword" not in str(e):
            raise
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, NonFiniteLossError) else 2
