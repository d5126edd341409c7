"""Divergence: a non-finite loss, architecture gradient, weight, BatchNorm statistic or
validation loss stops the run before any checkpoint holding it is written.

The training step records a device-side flag (no host synchronisation per step); the flags
are read at every reporting boundary, which Determined reaches before each validation and
checkpoint, and every checkpoint's tensors are scanned before it is written. Locally the run
stops with one line; on a cluster the trial raises ``det.InvalidHP``, so the searcher drops
the configuration instead of restarting it into the same NaN."""
from __future__ import annotations

from typing import Any, Iterator, Optional

import determined as det
import determined.pytorch  # noqa: F401
import torch


class Divergence(FloatingPointError):
    """The run diverged (one line: what, at which step, what to change)."""


def on_cluster() -> bool:
    info = det.get_cluster_info()
    return info is not None and info.task_type == "TRIAL"


def _tensors(obj: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield name, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}[{i}]")


def first_non_finite(obj: Any) -> Optional[str]:
    """The name of the first tensor in a nested state holding NaN or inf, or None."""
    tensors = list(_tensors(obj, ""))
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(t).all().cpu() for _, t in tensors])
    if bool(finite.all()):
        return None
    return tensors[int((~finite).nonzero()[0])][0]


class Health(det.pytorch.PyTorchCallback):
    """Collects the per-step finite flags of a trial and stops it when one is false."""

    def __init__(self, trial: Any, advice: str):
        self.trial, self.advice = trial, advice
        self.pending: list[tuple[int, str, torch.Tensor]] = []   # (step, what, device bool)
        self.checked_step = 0

    def record(self, step: int, what: str, finite: torch.Tensor) -> None:
        self.pending.append((step, what, finite))

    def stop(self, message: str) -> None:
        message = f"{message}; {self.advice}"
        if on_cluster():
            raise det.InvalidHP(message)
        raise Divergence(message)

    def check_steps(self) -> None:
        """Read the recorded flags (one host synchronisation) and agree over ranks."""
        bad = None
        if self.pending:
            flags = torch.stack([f.reshape(()).to(torch.bool) for _, _, f in self.pending]).cpu()
            if not bool(flags.all()):
                step, what, _ = self.pending[int((~flags).nonzero()[0])]
                bad = (step, what)
        self.pending.clear()
        dist = self.trial.context.distributed
        if dist.get_size() > 1:
            found = [b for b in dist.allgather(bad) if b is not None]
            bad = min(found) if found else None
        if bad is not None:
            self.stop(f"the run diverged: {bad[1]} is not finite at step {bad[0]}, so no checkpoint after step "
                      f"{self.checked_step} was written")
        self.checked_step = self.trial.steps

    def on_training_workload_end(self, avg_metrics: Any, batch_metrics: Any) -> None:
        self.check_steps()

    def on_checkpoint_save_start(self, checkpoint: dict[str, Any]) -> None:
        self.trial.faults.hit("save_start", self.trial.steps)
        if self.trial.context.distributed.get_size() == 1:
            self.check_steps()      # (under torchrun the ranks check together, at every reporting boundary)
        bad = first_non_finite({k: checkpoint[k] for k in ("models_state_dict", "optimizers_state_dict", "callbacks")
                                if k in checkpoint})
        if bad is not None:
            self.stop(f"the run diverged: {bad} is not finite at step {self.trial.steps}; its checkpoint was not "
                      "written")
        self.trial.faults.hit("torch_save", self.trial.steps)

    def check_validation(self, loss: float) -> None:
        if not torch.isfinite(torch.tensor(loss)):
            self.stop(f"the run diverged: the validation loss is {loss} at step {self.trial.steps}")
