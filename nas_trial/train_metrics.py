"""Training metrics that stay on the device until Determined reports them.

Determined 0.38 copies every tensor a ``train_batch`` returns to the host after each batch
(``metric.cpu()``), a host synchronisation per step on a GPU. The trials return only plain
numbers (the learning rate) and add the step's tensors (loss, accuracy, architecture loss)
to ``DeviceMeans``, a Determined ``MetricReducer``: running sums on the device, one host
transfer per slot when the metrics are reported, averaged over slots by batch count (the
slots train the same number of batches, so this is the mean over all of them).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import determined as det
import determined.pytorch  # noqa: F401  (det.pytorch.MetricReducer)
import torch


class DeviceMeans(det.pytorch.MetricReducer):
    """Per-name running sums of 0-dim tensors on their device; the mean per reporting window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def update(self, metrics: Mapping[str, Optional[torch.Tensor]]) -> None:
        for name, value in metrics.items():
            if value is None:
                continue
            value = value.detach().float()
            self.sums[name] = value if name not in self.sums else self.sums[name] + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def per_slot_reduce(self) -> dict[str, tuple[float, int]]:
        if not self.sums:
            return {}
        names = list(self.sums)
        sums = torch.stack([self.sums[n] for n in names]).tolist()      # one host transfer
        return {n: (s, self.counts[n]) for n, s in zip(names, sums)}

    def cross_slot_reduce(self, per_slot_metrics: list[dict[str, tuple[float, int]]]) -> dict[str, Any]:
        out = {}
        for name in {n for slot in per_slot_metrics for n in slot}:
            total = sum(slot[name][0] for slot in per_slot_metrics if name in slot)
            count = sum(slot[name][1] for slot in per_slot_metrics if name in slot)
            out[name] = total / count
        return out
