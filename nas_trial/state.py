"""What a trial keeps across checkpoints beyond Determined's own state: its step counter and
extra state (architecture optimizer, ...), a ``progress.json`` for resuming the data position,
and files written beside each checkpoint (``genotype.json``)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import determined as det
import determined.pytorch  # noqa: F401  (det.pytorch below)

PROGRESS_FILE = "progress.json"


def checkpoint_batches(checkpoint: Optional[str]) -> int:
    """Batches trained at a local checkpoint directory (0 when unknown, e.g. a cluster UUID)."""
    if not checkpoint or not os.path.isdir(checkpoint):
        return 0
    path = Path(checkpoint) / PROGRESS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint} has no {PROGRESS_FILE}: it is not a checkpoint written by this project")
    return int(json.loads(path.read_text())["batches_trained"])


def epoch_length(batches_per_epoch: int, world_size: int) -> int:
    """Batches per epoch on the chief, as Determined counts them (batches dealt round-robin)."""
    return math.ceil(batches_per_epoch / world_size)


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=_jsonable))


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


class TrialState(det.pytorch.PyTorchCallback):
    """Callback that carries a trial's own state through Determined checkpoints.

    * ``on_trial_startup``: a local resume (Determined 0.38 restarts its batch counter at 0
      off-cluster and does not skip the data loader) sets ``trial.start_batch`` to the batches
      the checkpoint had trained, so the trial's sampler skips them itself. On a cluster
      Determined skips (``first_batch_idx`` equals the checkpoint's batches) and nothing is added.
    * ``state_dict`` / ``load_state_dict``: ``trial.steps`` and ``trial.extra_state()``.
    * ``on_checkpoint_write_end``: writes ``progress.json`` and whatever ``write_files`` adds.
    """

    def __init__(self, trial: Any, write_files: Optional[Callable[[Path], None]] = None):
        self.trial = trial
        self.write_files = write_files

    def on_trial_startup(self, first_batch_idx: int, checkpoint_uuid: Optional[str]) -> None:
        self.trial.start_batch = max(checkpoint_batches(checkpoint_uuid) - first_batch_idx, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.trial.steps, "extra": self.trial.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trial.steps = state["steps"]
        self.trial.load_extra_state(state["extra"])

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self.trial.last_metrics = {k: v for k, v in metrics.items()}

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        path = Path(checkpoint_dir)
        write_json(path / PROGRESS_FILE, {"batches_trained": self.trial.steps})
        if self.write_files is not None:
            self.write_files(path)
        self.trial.last_checkpoint = str(path)
