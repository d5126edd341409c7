"""ASHA's stop, which Determined 0.38.1 never delivers to a running trial.

In 0.38.1 the harness no longer asks the master for searcher operations. When adaptive ASHA
decides that a trial stops, the master marks it STOPPING_COMPLETED (``trial.go``,
``PatchSearcherState``) and sends its allocation no signal (``transition`` signals only
StoppingCanceled, StoppingKilled and StoppingError). A trial that does not ask therefore
trains to ``max_time``.

So the chief asks, once per validation, after Determined has reported it (the master's
searcher decides while it handles that report): at the next hook that every rank runs.
That is the checkpoint that follows the validation (``on_checkpoint_upload_end``) or, when
none does, the next reporting boundary (``on_training_workload_end``). The answer is
broadcast to every rank. When the trial is stopping (the master copies its experiment's
stopping state into every trial), every rank asks Determined to stop. Determined then
checkpoints if the last checkpoint is not current and exits 0. The trial ends COMPLETED with
the metrics of its last validation.

A failed request is logged once, and training goes on. Locally there is no master to ask.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import determined as det
import determined.pytorch  # noqa: F401
from determined.common.api import bindings

STOPPING = {s.value for s in bindings.trialv1State if s.name.startswith("STOPPING_")}
REQUEST_TIMEOUT_S = 10

MasterTrial = Callable[[Any], Optional[tuple[Any, int]]]


def master_trial(context: Any) -> Optional[tuple[Any, int]]:
    """On a cluster, the core context's master session and this trial's id; None locally."""
    info = det.get_cluster_info()
    session = getattr(context._core, "_session", None)
    if info is None or info.task_type != "TRIAL" or session is None:
        return None
    return session, info.trial.trial_id


class StopWhenMasterStops(det.pytorch.PyTorchCallback):
    """After each validation, stop every rank when the master has marked the trial stopping."""

    def __init__(self, context: Any, name: str, master: Optional[MasterTrial] = None):
        self.context, self.name = context, name
        self.master = master if master is not None else master_trial
        self.validated = False        # a validation was reported and nobody has asked since
        self.failures = 0
        self.requests = 0

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self.validated = True         # Determined reports it right after this callback

    def on_checkpoint_upload_end(self, uuid: str) -> None:
        self._ask()

    def on_training_workload_end(self, avg_metrics: Any, batch_metrics: Any) -> None:
        self._ask()

    def _ask(self) -> None:
        if not self.validated:
            return
        self.validated = False
        dist = self.context.distributed
        state = self._trial_state() if dist.get_rank() == 0 else None
        if dist.get_size() > 1:
            state = dist.broadcast(state)
        if state in STOPPING:
            if dist.get_rank() == 0:
                print(f"[{self.name}] the master has marked this trial {state.removeprefix('STATE_')} (an ASHA stop "
                      "or the experiment stopping): checkpoint, then exit", flush=True)
            self.context.set_stop_requested(True)

    def _trial_state(self) -> Optional[str]:
        where = self.master(self.context)
        if where is None:
            return None
        session, trial_id = where
        self.requests += 1
        try:
            response = session.get(f"/api/v1/trials/{trial_id}", timeout=REQUEST_TIMEOUT_S)
            return bindings.v1GetTrialResponse.from_json(response.json()).trial.state.value
        except Exception as e:  # any failure: the trial goes on; said once
            self.failures += 1
            if self.failures == 1:
                print(f"[{self.name}] warning: could not ask the master for this trial's state "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); training goes on, "
                      "and an ASHA stop is not seen until a later request succeeds", file=sys.stderr, flush=True)
            return None
