"""Fault injection for the kill tests: ``NAS_FAULT_KILL=<point>@<batch>`` makes the process
SIGKILL itself at that point of the run, as ``kill -9`` or a lost machine would.

Points, in the order a checkpoint at batch ``b`` passes them:

* ``step@b``: right after training step ``b`` (before Determined counts it);
* ``save_start@b``: the checkpoint directory exists (code copied), no state written yet;
* ``torch_save@b``: half of ``state_dict.pth`` written;
* ``files@b``: Determined's files written, ``genotype.json`` not yet;
* ``progress@b``: everything but ``progress.json``, the mark of a complete checkpoint.

``NAS_FAULT_STEP_DELAY=<seconds>`` sleeps that long after every training step, so that a test
can send a signal while the run is still training.
"""
from __future__ import annotations

import io
import os
import signal
import time
from typing import Optional

ENV = "NAS_FAULT_KILL"
DELAY_ENV = "NAS_FAULT_STEP_DELAY"
POINTS = ("step", "save_start", "torch_save", "files", "progress")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Faults:
    def __init__(self, spec: Optional[str] = None):
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.point: Optional[str] = None
        self.batch = -1
        if spec:
            point, _, batch = spec.partition("@")
            if point not in POINTS or not batch.isdigit():
                raise ValueError(f"{ENV}={spec!r}: expected <point>@<batch> with a point among {', '.join(POINTS)}")
            self.point, self.batch = point, int(batch)
        self.delay = float(os.environ.get(DELAY_ENV) or 0.0)

    def hit(self, point: str, batch: int) -> None:
        if point == "step" and self.delay:
            time.sleep(self.delay)
        if point != self.point or batch != self.batch:
            return
        if point == "torch_save":
            self._die_in_next_torch_save()
        else:
            _die()

    @staticmethod
    def _die_in_next_torch_save() -> None:
        import torch

        def half_save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            _die()

        original = torch.save
        torch.save = half_save
