"""Clean local interrupts: the first SIGINT (Ctrl-C) or SIGTERM lets the current training
step finish, then the trial writes a checkpoint and the runner prints the resume command and
exits non-zero, without a traceback. A second signal stops at once (the last complete
checkpoint stays); a signal within a second of the first counts as the same one (Ctrl-C under
``torchrun`` reaches each rank twice: from the terminal and forwarded). If the run cannot finish within ``grace_s`` seconds (e.g. another process
of a ``torchrun`` job died and a collective waits for it), it exits with one line.

On a cluster nothing is installed: Determined's preemption checkpoints and exits there."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

import determined as det
import determined.pytorch  # noqa: F401

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
SAME_SIGNAL_S = 1.0


class Interrupt:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.at = 0.0
        self.on_timeout: Callable[[], str] = lambda: ""
        self.grace_s = 60.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1)

    def install(self, grace_s: float, on_timeout: Callable[[], str]) -> None:
        self.grace_s, self.on_timeout = grace_s, on_timeout
        for s in EXIT_CODES:
            self._previous[s] = signal.signal(s, self._handle)

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if time.monotonic() - self.at < SAME_SIGNAL_S:
                return
            print(f"error: second {signal.Signals(signum).name}: stopped at once. {self.on_timeout()}",
                  file=sys.stderr, flush=True)
            os._exit(self.exit_code)
        self.signum, self.at = signum, time.monotonic()
        timer = threading.Timer(self.grace_s, self._timeout)
        timer.daemon = True
        timer.start()

    def _timeout(self) -> None:
        print(f"error: {signal.Signals(self.signum).name} received but the run could not write a checkpoint within "
              f"{self.grace_s:.0f} s (another process of this run may have died). {self.on_timeout()}",
              file=sys.stderr, flush=True)
        os._exit(self.exit_code)


INTERRUPT = Interrupt()


def ignore_in_workers(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group; the workers leave
    it to the main process, which stops them in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopOnInterrupt(det.pytorch.PyTorchCallback):
    """Under ``torchrun`` the ranks must stop at the same batch: at each reporting boundary
    they share whether any was interrupted, and all ask Determined to stop (it checkpoints)."""

    def __init__(self, context: Any):
        self.context = context

    def on_training_workload_end(self, avg_metrics: Any, batch_metrics: Any) -> None:
        if any(self.context.distributed.allgather(INTERRUPT.requested)):
            self.context.set_stop_requested(True)
