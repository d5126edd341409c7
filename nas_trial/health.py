"""Divergence: a non-finite loss, architecture gradient, weight, BatchNorm statistic or
validation loss stops the run before any checkpoint holding it is written.

Determined 0.38 saves checkpoints and calls ``evaluate_full_dataset`` on the chief alone, so
a rank that raised there would leave the others waiting in a broadcast. Every decision is
therefore taken on all ranks together, before any chief-only code runs:

* at every reporting boundary (``on_training_workload_end``, every rank): the per-step finite
  flags recorded on the device since the last boundary (one host transfer) and the tensors a
  checkpoint would hold (weights, BatchNorm statistics, optimizer and callback state), with
  the findings of all ranks gathered. Every checkpoint of a multi-rank run follows such a
  boundary with no training step in between;
* at every validation (``EveryRankValidation``, every rank): the combined validation loss,
  which the chief broadcasts before anything is reported;
* on one process also inside the checkpoint itself: a local Ctrl-C checkpoints between
  boundaries.

The ranks then leave the same way, as Determined's controller leaves on ``det.InvalidHP``:
the chief prints the one line (what diverged, at which step, what to lower) and reports the
early exit with reason ``INVALID_HP`` (the searcher drops the configuration instead of
restarting it into the same NaN; ASHA counts it as a finished trial), and every rank raises
``_ShouldExit(skip_exit_checkpoint=True)``: no exit checkpoint, nobody waits for anybody.
On a cluster the trial then exits 0 as Determined's own InvalidHP path does; a local run
exits 1."""
from __future__ import annotations

import math
import sys
from typing import Any, Iterator, Optional

import determined as det
import determined.pytorch  # noqa: F401
import torch

Finding = tuple[int, str]       # (step, the line saying what diverged)


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
    """The name of the first tensor in a nested state holding NaN or inf, or None. One host
    transfer per device the tensors live on, none per tensor."""
    tensors = list(_tensors(obj, ""))
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    bad = []
    for idx in by_device.values():
        finite = torch.stack([torch.isfinite(tensors[i][1]).all() for i in idx]).cpu()
        if not bool(finite.all()):
            bad.append(idx[int((~finite).nonzero()[0])])
    return tensors[min(bad)][0] if bad else None


class Health(det.pytorch.PyTorchCallback):
    """Collects the per-step finite flags of a trial, checks what a checkpoint would hold, and
    stops every rank together when something is not finite (``diverged`` then holds the line)."""

    def __init__(self, trial: Any, advice: str):
        self.trial, self.advice = trial, advice
        self.pending: list[tuple[int, str, torch.Tensor]] = []   # (step, what, device bool)
        self.checked_step = 0
        self.diverged: Optional[str] = None

    def record(self, step: int, what: str, finite: torch.Tensor) -> None:
        self.pending.append((step, what, finite))

    # -- findings (this rank's) ------------------------------------------------------------
    def _step_finding(self) -> Optional[Finding]:
        """The first recorded step whose flag is false; the flags are cleared."""
        found = None
        if self.pending:
            flags = torch.stack([f.reshape(()).to(torch.bool) for _, _, f in self.pending]).cpu()
            if not bool(flags.all()):
                step, what, _ = self.pending[int((~flags).nonzero()[0])]
                found = (step, f"the run diverged: {what} is not finite at step {step}, so no checkpoint after "
                               f"step {self.checked_step} was written")
        self.pending.clear()
        return found

    def _state_finding(self, state: Any) -> Optional[Finding]:
        name = first_non_finite(state)
        if name is None:
            return None
        step = self.trial.steps
        return step, f"the run diverged: {name} is not finite at step {step}; no checkpoint holding it was written"

    # -- decisions (all ranks) -------------------------------------------------------------
    def check(self) -> None:
        """Every rank at a reporting boundary: the step flags since the last check and the
        state a checkpoint would hold; the ranks agree and leave together."""
        found = self._step_finding() or self._state_finding(self.trial.checkpoint_state())
        dist = self.trial.context.distributed
        if dist.get_size() > 1:
            everyone = [f for f in dist.allgather(found) if f is not None]
            found = min(everyone) if everyone else None
        if found is not None:
            self.leave(found[1])
        self.checked_step = self.trial.steps

    def check_validation(self, loss: float) -> None:
        """Every rank, with the chief's combined validation loss (the same number everywhere)."""
        if not math.isfinite(loss):
            self.leave(f"the run diverged: the validation loss is {loss} at step {self.trial.steps}")

    def leave(self, message: str) -> None:
        """All ranks call this together: the chief says why and reports the early exit; every
        rank leaves Determined's training loop without an exit checkpoint."""
        self.diverged = f"{message}; {self.advice}"
        if self.trial.context.distributed.get_rank() == 0:
            print(f"error: {self.diverged}", file=sys.stderr, flush=True)
            self.trial.context._core.train.report_early_exit(det.core.EarlyExitReason.INVALID_HP)
        raise det.pytorch._ShouldExit(skip_exit_checkpoint=True)

    # -- callbacks -------------------------------------------------------------------------
    def on_training_workload_end(self, avg_metrics: Any, batch_metrics: Any) -> None:
        self.check()

    def on_checkpoint_save_start(self, checkpoint: dict[str, Any]) -> None:
        self.trial.faults.hit("save_start", self.trial.steps)
        if self.trial.context.distributed.get_size() == 1:
            # one process may checkpoint between boundaries (a local Ctrl-C); on several the
            # boundary before every checkpoint has checked this state on every rank
            found = self._step_finding() or self._state_finding(
                {k: checkpoint[k] for k in ("models_state_dict", "optimizers_state_dict", "callbacks")
                 if k in checkpoint})
            if found is not None:
                self.leave(found[1])
        self.trial.faults.hit("torch_save", self.trial.steps)
