"""Run a trial locally through Determined's trial controller (CPU or GPU, one process or
``torchrun``), or on a cluster as the experiment's entrypoint.

Local runs resume as a cluster does: Determined 0.38's ``Trainer.fit`` restarts its batch
counter at 0 off-cluster, so the local runner builds the same controller ``fit`` builds with
the checkpoint's batch count as ``steps_completed``. Data position, epoch boundaries (LR
schedule), validation and checkpoint points then count from the start of the run, and a run
resumed at any batch ends bitwise equal to the uninterrupted one on CPU.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import shlex
import shutil
import signal
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from nas_settings import ArgumentParser

from .interrupt import INTERRUPT
from .state import (CheckpointError, check_compatible, complete_checkpoints, find_checkpoint,
                    load_checkpoint_state, read_progress)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REPORT_EVERY = 10           # batches between reporting boundaries: divergence checks, interrupts under torchrun
# After SIGINT/SIGTERM, exit with one line if the run has not stopped by then. torchrun sends
# SIGTERM to the other ranks when one dies and SIGKILL 30 s later: a rank says why before that.
INTERRUPT_GRACE_S = {"single": 300.0, "torchrun": 25.0}
SHORT_SEARCH_STEPS = 1000   # below this many steps the report explains what a short search shows
USAGE = "python model_def.py experiments/<x>.yaml [--set key=value ...] [--max-batches N] [--output DIR] [--resume DIR]"


@lru_cache(maxsize=1)
def _yaml11_loader() -> type:
    """PyYAML's safe loader, reading ``1e-3`` as a float like the master's YAML 1.1 does.
    (PyYAML is imported here, for local runs only: on a cluster the trial reads no YAML, and
    Determined itself brings ruamel.yaml, not PyYAML.)"""
    import yaml

    class Yaml11Loader(yaml.SafeLoader):
        pass

    Yaml11Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return Yaml11Loader


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            config = yaml.load(f, Loader=_yaml11_loader())
    except FileNotFoundError:
        raise ValueError(f"experiment config {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"experiment config {str(path)!r} is a directory; give an experiment YAML file "
                         "(experiments/<x>.yaml)") from None
    except UnicodeDecodeError:
        raise ValueError(f"experiment config {str(path)!r} is not a text file; give an experiment YAML file "
                         "(experiments/<x>.yaml)") from None
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
        node[path[-1]] = _yaml_value(raw)
    return config


def _yaml_value(raw: str) -> Any:
    """A ``--set`` value read as YAML; text YAML cannot read (``|nor_conv_3x3~0|+...``, an
    unbalanced bracket) is taken as the string it is, and the setting's own check judges it."""
    import yaml

    try:
        return yaml.load(raw, Loader=_yaml11_loader())
    except yaml.YAMLError:
        return raw


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
    p = ArgumentParser(prog="python model_def.py", usage=USAGE,
                       description="Run a search or retraining locally through Determined's Trainer API.")
    p.add_argument("config", help="experiment YAML (experiments/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter (or data.x, searcher.x, ...); repeatable")
    p.add_argument("--max-batches", type=_positive, default=None,
                   help="stop after this many batches in total (a resumed run continues to the same total)")
    p.add_argument("--output", default=None, help="directory for checkpoints (default ~/nas-runs/<name>-<time>)")
    p.add_argument("--resume", default=None,
                   help="a checkpoint directory, or a run's --output directory (its newest complete checkpoint)")
    p.add_argument("--validate-every", type=_positive, default=None,
                   help="batches between validations (default: per epoch)")
    p.add_argument("--checkpoint-every", type=_positive, default=None, help="batches between checkpoints")
    return p.parse_args(argv)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


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


def _output_dir(args: argparse.Namespace, name: str) -> Path:
    output = Path(args.output or Path.home() / "nas-runs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    output = output.expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {args.output}: is a file; give a directory (it is created if missing)")
    existing = next(p for p in (output, *output.parents) if p.exists())     # the folder it is created in
    if not existing.is_dir():
        raise ValueError(f"--output {args.output}: {existing} is a file, so no directory can be created below it; "
                         "give a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output {args.output}: {existing} is not writable; give a directory you can write")
    return output


def _resume_command(argv: list[str], output: Path) -> str:
    """The command line that continues this run from its newest complete checkpoint."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--resume", "--output"):
            skip = True
        elif not a.startswith(("--resume=", "--output=")):
            kept.append(a)
    return shlex.join(["python", "model_def.py", *kept, "--output", str(output), "--resume", str(output)])


def _check_state_matches(state: Mapping[str, Any], models: list, checkpoint: Path) -> None:
    """The checkpoint's model state has this run's parameter names and shapes (else one line)."""
    saved = state.get("models_state_dict") if isinstance(state, Mapping) else None
    if not isinstance(saved, list) or len(saved) != len(models):
        raise CheckpointError(f"--resume {checkpoint}: state_dict.pth is not a checkpoint of this kind of run")
    for saved_sd, model in zip(saved, models):
        ours = {k.removeprefix("module."): v for k, v in model.state_dict().items()}
        theirs = {k.removeprefix("module."): v for k, v in saved_sd.items()}
        for key in sorted(set(ours) | set(theirs)):
            a, b = theirs.get(key), ours.get(key)
            if a is None or b is None or tuple(a.shape) != tuple(b.shape):
                what = lambda t: "absent" if t is None else f"shape {tuple(t.shape)}"  # noqa: E731
                raise CheckpointError(f"--resume {checkpoint}: {key} is {what(a)} in the checkpoint but {what(b)} "
                                      "in this run; resume with the settings the checkpoint was written with")


def _remove_incomplete(storage: Path, since_ns: int) -> None:
    """Checkpoint directories this run began but did not finish (a stop inside a checkpoint)."""
    for d in storage.iterdir() if storage.is_dir() else []:
        if d.is_dir() and read_progress(d) is None and d.stat().st_mtime_ns >= since_ns:
            shutil.rmtree(d, ignore_errors=True)


def run_local(args: argparse.Namespace, trial_class: Callable, argv: list[str]) -> int:
    import determined as det
    import torch

    from .observe import WARMUP_LABEL
    from .report import write_report

    config = apply_overrides(load_config(args.config), args.overrides)
    data = config.get("data") or {}
    if not isinstance(data, dict):
        raise ValueError(f"the data section of {args.config} must be a mapping, got {data!r}")
    for key in ("root", "cache_dir"):  # paths given on the command line are relative to the caller's cwd
        if any(o.startswith(f"data.{key}=") for o in args.overrides) and data.get(key):
            data[key] = str(Path(data[key]).expanduser().resolve())
    bench = config["hyperparameters"].get("benchmark")
    if isinstance(bench, dict) and isinstance(bench.get("file"), str) and \
            any(o.startswith("benchmark.file=") for o in args.overrides):
        bench["file"] = str(Path(bench["file"]).expanduser().resolve())     # relative to the caller's cwd
    budget = config["hyperparameters"].get("budget")
    if isinstance(budget, dict) and isinstance(budget.get("table"), str) and \
            any(o.startswith("budget.table=") for o in args.overrides):
        budget["table"] = str(Path(budget["table"]).expanduser().resolve())     # relative to the caller's cwd
    hparams = pick_hparams(config["hyperparameters"])
    trial_cls = trial_class(hparams)
    trial_cls.check_settings(hparams, data)       # one line for a bad setting, before anything starts
    name = config.get("name") or Path(args.config).stem
    output = _output_dir(args, name)
    latest, progress, note = find_checkpoint(args.resume) if args.resume else (None, None, None)
    done = progress["batches_trained"] if progress else 0
    if args.max_batches is not None and args.max_batches < done:
        raise ValueError(f"--max-batches {args.max_batches}: the checkpoint has already trained {done} batches; "
                         f"ask for more than {done}")
    saved_state = load_checkpoint_state(latest) if latest else None
    storage = output / "determined"
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
    started_ns = time.time_ns()

    # Tensorboard off locally: Determined would write it to ./runs (the Observer writes under --output).
    with det.pytorch.init(hparams=hparams, exp_conf=config, distributed=distributed,
                          enable_tensorboard_logging=False) as context:
        trial = trial_cls(context)
        trial.settings["slots"] = trial.world
        if latest:
            check_compatible(progress, trial.settings, latest)
            _check_state_matches(saved_state, context.models, latest)
        del saved_state
        total = trial.total_steps if args.max_batches is None else args.max_batches
        if total <= done:
            if rank == 0:
                print(f"nothing to do: the checkpoint already has {done} of {total} batches", flush=True)
            return 0
        # Everything is checked: from here on the run writes under --output.
        try:
            storage.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--output {args.output or output}: cannot create {storage} ({e.strerror}); give a "
                             "directory you can write") from None
        trial.observer.run_dir = output          # TensorBoard event files under --output
        trial.progress.total = total
        epoch_len = trial.epoch_len
        validate = args.validate_every or epoch_len * trial.cfg.validate_every
        ckpt = args.checkpoint_every or epoch_len * trial.cfg.checkpoint_every
        if rank == 0:
            if note:
                print(f"[{trial.name}] resuming from the {note}", flush=True)
            print(f"[{trial.name}] {type(trial).__name__}: {total} batches ({epoch_len} per epoch, "
                  f"{trial.per_slot} per slot x {trial.world} slot(s)); checkpoints under {storage}"
                  + (f"; resuming at batch {done}" if done else ""), flush=True)
            print(f"[{trial.name}] hyperparameters: {hparams}", flush=True)
        context._steps_completed = done
        controller = det.pytorch._PyTorchTrialController(
            trial_inst=trial, context=context, checkpoint_period=det.pytorch.Batch(ckpt),
            validation_period=det.pytorch.Batch(validate), reporting_period=det.pytorch.Batch(REPORT_EVERY),
            smaller_is_better=True, steps_completed=done, latest_checkpoint=str(latest) if latest else None,
            local_training=True, test_mode=False, searcher_metric_name=None, checkpoint_policy="all",
            step_zero_validation=False, max_length=det.pytorch.Batch(total), global_batch_size=None,
            profiling_enabled=False)
        INTERRUPT.install(grace_s=INTERRUPT_GRACE_S["torchrun" if trial.world > 1 else "single"],
                          on_timeout=lambda: _last_good(storage, argv, output))
        try:
            _run_controller(controller.run, trial)
        except CheckpointError:
            _remove_incomplete(storage, started_ns)
            raise
        finally:
            INTERRUPT.uninstall()
        if trial.health.diverged:           # the chief has said why (trial.health.leave)
            _remove_incomplete(storage, started_ns)
            return 1
        if INTERRUPT.requested:
            if rank == 0:
                print(f"error: stopped by {signal.Signals(INTERRUPT.signum).name} at batch {trial.steps}; checkpoint "
                      f"{trial.last_checkpoint}; continue with: {_resume_command(argv, output)}",
                      file=sys.stderr, flush=True)
            return INTERRUPT.exit_code
        if rank == 0:
            print(f"[{trial.name}] finished at batch {trial.steps}; last checkpoint: {trial.last_checkpoint}", flush=True)
            if trial.last_checkpoint and (Path(trial.last_checkpoint) / "genotype.json").exists():
                print(f"[{trial.name}] genotype: {trial.current_genotype() or WARMUP_LABEL}", flush=True)
                print(f"[{trial.name}] genotype.json: {Path(trial.last_checkpoint) / 'genotype.json'}", flush=True)
            report = write_report(output, trial.name, trial.observer.history, trial.current_genotype(),
                                  trial.observer.cost.totals(trial.steps), name,
                                  short_search=trial.steps < SHORT_SEARCH_STEPS)
            print(f"[{trial.name}] report: {report}  (TensorBoard: tensorboard --logdir {output / 'tensorboard'})",
                  flush=True)
    return 0


def _last_good(storage: Path, argv: list[str], output: Path) -> str:
    found = complete_checkpoints(storage)
    if not found:
        return "No complete checkpoint was written."
    return f"The last complete checkpoint is {found[-1][1]} (batch {found[-1][0]}); continue with: " \
           f"{_resume_command(argv, output)}"


def run_cluster(info: Any, trial_class: Callable) -> int:
    import determined as det

    hparams = info.trial.hparams
    with det.pytorch.init(hparams=hparams) as context:
        trial = trial_class(hparams)(context)
        searcher = context.get_experiment_config().get("searcher", {})
        unit = {"batches": det.pytorch.Batch, "epochs": det.pytorch.Epoch}.get(searcher.get("time_metric"))
        max_length = unit(searcher["max_time"]) if unit and searcher.get("max_time") else det.pytorch.Epoch(trial.cfg.epochs)
        _run_controller(lambda: det.pytorch.Trainer(trial, context).fit(
            max_length=max_length, latest_checkpoint=info.latest_checkpoint,
            validation_period=det.pytorch.Epoch(trial.cfg.validate_every),
            checkpoint_period=det.pytorch.Epoch(trial.cfg.checkpoint_every),
            # fit() does not read the experiment's checkpoint_policy itself (its default is "best")
            checkpoint_policy=context.get_experiment_config().get("checkpoint_policy", "best")), trial)
    # A diverged trial has reported its early exit (INVALID_HP) and exits 0, as Determined's
    # own InvalidHP path does: the searcher drops it instead of restarting it.
    return 0


def _run_controller(run: Callable[[], Any], trial: Any) -> None:
    """Determined's training loop. When the ranks agree the run diverged they leave it with
    ``_ShouldExit(skip_exit_checkpoint=True)``, which escapes the loop if raised inside the
    exit checkpoint of a single process (after a local Ctrl-C)."""
    import determined as det

    try:
        run()
    except det.pytorch._ShouldExit:
        if not trial.health.diverged:
            raise


def main(argv: list[str], trial_class: Callable) -> int:
    # Determined 0.38 restores checkpoints (numpy RNG state included) with a plain torch.load,
    # which torch >= 2.6 refuses unless weights-only loading is turned off.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import determined as det

    from nas_data import DataError
    from optimizers.search import NonFiniteLossError
    from search_spaces import GenotypeError

    info = det.get_cluster_info()
    if info is not None and info.task_type == "TRIAL":
        return run_cluster(info, trial_class)
    try:
        return run_local(_parse(argv), trial_class, argv)
    except (ValueError, TypeError, GenotypeError, DataError, FileNotFoundError,
            det.errors.InvalidExperimentException) as e:
        if isinstance(e, TypeError) and "unexpected keyword" not in str(e):
            raise
        return _fail(e, 2)
    except NonFiniteLossError as e:
        return _fail(e, 1)
    except RuntimeError as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _is_collective_failure(e):
            cause = re.search(r"\] ([^\[]*?)(?: \[|\.|$)", str(e).splitlines()[0])
            return _fail(f"rank {os.environ.get('RANK', '?')}: another process of this run stopped "
                         f"({cause.group(1) if cause else type(e).__name__}); this one stops too. "
                         f"{INTERRUPT.on_timeout()}", 1)
        raise


def _is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistBackendError", ())) or any(
        s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out"))


def _fail(e: Any, code: int) -> int:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "\nOriginal Traceback" in str(e):       # raised in a DataLoader worker: its own message is the last line
        last = str(e).strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    print(f"error: {text}", file=sys.stderr, flush=True)
    return code
