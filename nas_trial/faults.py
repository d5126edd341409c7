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

``NAS_FAULT_NAN=<place>@<batch>`` makes the run diverge there, for the divergence tests:

* ``loss@b``: step ``b``'s finite flag is false, on the last rank only (the ranks must agree);
* ``weight@b``: after step ``b`` a weight holds NaN on every rank (as DDP's identical
  replicas would), while every loss so far was finite: only the scan of the state finds it;
* ``val_loss@b``: the validation at batch ``b`` combines to NaN on the chief.
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
NAN_ENV = "NAS_FAULT_NAN"
NAN_PLACES = ("loss", "weight", "val_loss")


def _parse(spec: str, env: str, points: tuple[str, ...]) -> tuple[Optional[str], int]:
    if not spec:
        return None, -1
    point, _, batch = spec.partition("@")
    if point not in points or not batch.isdigit():
        raise ValueError(f"{env}={spec!r}: expected <point>@<batch> with a point among {', '.join(points)}")
    return point, int(batch)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Faults:
    def __init__(self, spec: Optional[str] = None):
        self.point, self.batch = _parse(os.environ.get(ENV, "") if spec is None else spec, ENV, POINTS)
        self.delay = float(os.environ.get(DELAY_ENV) or 0.0)
        self.nan_place, self.nan_batch = _parse(os.environ.get(NAN_ENV, "") if spec is None else "", NAN_ENV,
                                                NAN_PLACES)

    def nan(self, place: str, batch: int) -> bool:
        """Whether ``NAS_FAULT_NAN`` asks for a non-finite value at this place and batch."""
        return place == self.nan_place and batch == self.nan_batch

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
