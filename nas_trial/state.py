"""What a trial keeps across checkpoints beyond Determined's own state, and how a local run
finds the checkpoint to resume from.

Each checkpoint directory gets a ``progress.json`` (batches trained, the settings that must
match on resume) as the *last* file this project writes into it, through a rename: a
directory without one was interrupted while being written (``kill -9``, power loss of the
process) and is never resumed from. ``genotype.json`` and the other files come before it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import determined as det
import determined.pytorch  # noqa: F401  (det.pytorch below)

PROGRESS_FILE = "progress.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (one line, says what to do instead)."""


def read_progress(checkpoint: Path) -> Optional[dict[str, Any]]:
    """The checkpoint's ``progress.json``, or None when the directory is not a complete checkpoint."""
    try:
        progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) and isinstance(progress.get("batches_trained"), int) else None


def complete_checkpoints(storage: Path) -> list[tuple[int, Path]]:
    """(batches trained, directory) of every complete checkpoint directly under ``storage``, oldest first."""
    found = []
    for d in storage.iterdir() if storage.is_dir() else []:
        progress = read_progress(d) if d.is_dir() else None
        if progress is not None:
            found.append((progress["batches_trained"], d.stat().st_mtime_ns, d))
    return [(b, d) for b, _, d in sorted(found)]


def find_checkpoint(path: str | os.PathLike, what: str = "--resume") -> tuple[Path, dict[str, Any], Optional[str]]:
    """Resolve a checkpoint argument (``what`` names it in errors, e.g. ``--resume``): a
    checkpoint directory, or a run's output directory (or its ``determined/`` folder), whose
    newest complete checkpoint is taken. Returns the directory, its progress record, and a note
    saying which one was picked (None for a direct checkpoint)."""
    given = Path(path).expanduser().resolve()
    if not given.exists():
        raise CheckpointError(f"{what} {path}: no such file or directory; give a checkpoint directory or a "
                              "run's --output directory")
    if not given.is_dir():
        raise CheckpointError(f"{what} {path}: is a file; give a checkpoint directory or a run's --output directory")
    progress = read_progress(given)
    if progress is not None:
        return given, progress, None
    if (given / "state_dict.pth").exists() or (given / "load_data.json").exists() or (given / "code").is_dir():
        newest = complete_checkpoints(given.parent)
        hint = (f"; the newest complete checkpoint beside it is {newest[-1][1]} (batch {newest[-1][0]}): "
                f"use it, or the run directory {given.parent.parent}") if newest else \
            "; no complete checkpoint is beside it: start the run again"
        raise CheckpointError(f"{what} {path}: an incomplete checkpoint (its writing was interrupted){hint}")
    for storage in (given / "determined", given):
        found = complete_checkpoints(storage)
        if found:
            batches, directory = found[-1]
            return directory, read_progress(directory), \
                f"newest complete checkpoint of {given}: {directory} (batch {batches})"
    raise CheckpointError(f"{what} {path}: holds no complete checkpoint written by this project (looked for "
                          f"{PROGRESS_FILE} in it and in {given / 'determined'}/*)")


def load_checkpoint_state(checkpoint: Path, what: str = "--resume") -> Any:
    """``state_dict.pth`` of a checkpoint directory, or a one-line CheckpointError."""
    import torch

    try:
        return torch.load(checkpoint / "state_dict.pth", map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, zero bytes, not a torch file: all one line
        raise CheckpointError(f"{what} {checkpoint}: state_dict.pth cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'empty'}); use an earlier checkpoint or "
                              "the run directory") from None


def check_compatible(progress: Mapping[str, Any], settings: Mapping[str, Any], checkpoint: Path) -> None:
    """Refuse to resume when a setting that shapes the run differs from the checkpoint's."""
    saved = progress.get("settings")
    if not isinstance(saved, Mapping):
        return
    differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if differ:
        k = differ[0]
        more = f" (and {len(differ) - 1} more: {', '.join(differ[1:])})" if len(differ) > 1 else ""
        raise CheckpointError(f"--resume {checkpoint}: the checkpoint was written with {k}={saved.get(k)!r}, this "
                              f"run has {k}={settings.get(k)!r}{more}; resume with the checkpoint's settings or "
                              "start a new run")


def resume_settings(hparams: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint, flattened (``space_args.C``):
    every hyperparameter and the data section's choice of images (not where they are stored)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", dict(hparams))
    for key in ("dataset", "subset", "test_subset", "image_size", "train_fraction", "val_fraction", "crop_padding"):
        if key in data:
            flat[f"data.{key}"] = data[key]
    return json.loads(json.dumps(flat, default=str))


def run_name(checkpoint_dir: Path) -> str:
    """Which run wrote a checkpoint: ``experiment E trial T`` on a cluster, else the local
    run's output directory (checkpoints live in ``<output>/determined/<uuid>/``)."""
    info = det.get_cluster_info()
    if info is not None and info.task_type == "TRIAL":
        return f"experiment {info.trial.experiment_id} trial {info.trial.trial_id}"
    return str(checkpoint_dir.parent.parent)


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=_jsonable))


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


class TrialState(det.pytorch.PyTorchCallback):
    """Callback that carries a trial's own state through Determined checkpoints.

    * ``state_dict`` / ``load_state_dict``: ``trial.steps`` and ``trial.extra_state()``.
    * ``on_checkpoint_write_end``: whatever ``write_files`` adds (``genotype.json``), then
      ``progress.json``, the mark of a complete checkpoint.
    """

    def __init__(self, trial: Any, settings: Mapping[str, Any],
                 write_files: Optional[Callable[[Path], None]] = None):
        self.trial = trial
        self.settings = dict(settings)
        self.write_files = write_files

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.trial.steps, "extra": self.trial.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trial.steps = state["steps"]
        self.trial.load_extra_state(state["extra"])

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self.trial.last_metrics = {k: v for k, v in metrics.items()}

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        path = Path(checkpoint_dir)
        self.trial.faults.hit("files", self.trial.steps)
        if self.write_files is not None:
            self.write_files(path)
        self.trial.faults.hit("progress", self.trial.steps)
        write_json(path / PROGRESS_FILE, {"batches_trained": self.trial.steps, "settings": self.settings,
                                          "run": run_name(path)})
        self.trial.last_checkpoint = str(path)
