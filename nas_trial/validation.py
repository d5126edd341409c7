"""Validation on every slot, with the single slot's numbers.

Each rank evaluates its share of a held-out set: the set cut in order into batches as one
slot cuts it, dealt round-robin (``nas_data.ShardBatchSampler``). The chief adds the
per-batch sums in batch order, so loss and accuracy equal the single-slot values exactly
for the same weights, on any number of slots.

Determined 0.38 calls ``evaluate_full_dataset`` on the chief only, after every rank has run
its callbacks' ``on_validation_start``: ``EveryRankValidation`` measures there, and the
trial's ``evaluate_full_dataset`` reads ``measured``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import determined as det
import determined.pytorch  # noqa: F401  (det.pytorch.PyTorchCallback)
import torch
import torch.nn.functional as F

from nas_data import ShardBatchSampler

Forward = Callable[[torch.Tensor], torch.Tensor]        # images (B, 3, H, W) -> logits (B, classes)


@dataclass(frozen=True)
class BatchSums:
    batch: int          # position in the single-slot batch order
    loss: float         # summed cross-entropy over the batch
    correct: int
    count: int
    correct5: int = 0   # the label among the 5 largest logits (all of them with fewer classes)


def evaluate_batches(forward: Forward, loader, batch_ids, to_device: Callable) -> list[BatchSums]:
    """Per-batch sums over ``loader``, whose batches sit at ``batch_ids`` in the single-slot
    order. One host transfer at the end, none per batch."""
    losses, correct, correct5, counts = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            x, y = to_device(batch)
            logits = forward(x)
            losses.append(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct.append((logits.argmax(-1) == y).sum())
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices                  # (B, 5)
            correct5.append((top5 == y[:, None]).any(-1).sum())
            counts.append(len(y))
    if not losses:
        return []
    return [BatchSums(b, loss, c, n, c5) for b, loss, c, c5, n in
            zip(batch_ids, torch.stack(losses).tolist(), torch.stack(correct).tolist(), torch.stack(correct5).tolist(),
                counts)]


def combine(shards: list[list[BatchSums]]) -> dict[str, float]:
    """Every rank's batches back in single-slot order, summed in that order."""
    batches = sorted((b for shard in shards for b in shard), key=lambda b: b.batch)
    if [b.batch for b in batches] != list(range(len(batches))) or not batches:
        raise RuntimeError(f"validation batches missing or repeated: {[b.batch for b in batches]}")
    loss = 0.0
    for b in batches:
        loss += b.loss
    total = sum(b.count for b in batches)
    return {"loss": loss / total, "accuracy": sum(b.correct for b in batches) / total,
            "top5_accuracy": sum(b.correct5 for b in batches) / total, "images": total}


class EveryRankValidation(det.pytorch.PyTorchCallback):
    """Measures the trial's ``validation_sets()`` on every rank before Determined validates,
    adds what the chief alone measures (``validate_on_chief``), and gives every rank the
    combined results (``measured``, by set name), so that every rank decides on divergence
    before the chief reports anything."""

    def __init__(self, trial: Any):
        self.trial = trial
        self.measured: dict[str, dict[str, float]] = {}
        self._loaders: dict[str, tuple[Any, ShardBatchSampler]] = {}   # built once: workers persist

    def on_validation_start(self) -> None:
        trial, dist = self.trial, self.trial.context.distributed
        measured: dict[str, dict[str, float]] = {}
        for name, (dataset, forward) in trial.validation_sets().items():
            if name not in self._loaders:
                sampler = ShardBatchSampler(len(dataset), trial.eval_batch_size, dist.get_rank(), dist.get_size())
                self._loaders[name] = trial.eval_loader(dataset, trial.data_cfg.num_workers, sampler), sampler
            loader, sampler = self._loaders[name]
            mine = evaluate_batches(forward, loader, sampler.batch_ids(), trial.context.to_device)
            shards = dist.gather(mine)           # the chief gets every rank's list, the others None
            if shards is not None:
                measured[name] = combine(shards)
        counts = dist.gather(trial.rank_counts())   # e.g. images skipped by this rank's loader
        if counts is not None:
            measured["counts"] = {k: sum(c.get(k, 0) for c in counts) for k in sorted({k for c in counts for k in c})}
        if dist.get_rank() == 0:
            measured.update(trial.validate_on_chief())
            if trial.faults.nan("val_loss", trial.steps):
                measured["val"] = {**measured["val"], "loss": float("nan")}
        if dist.get_size() > 1:
            measured = dist.broadcast(measured)
        self.measured = measured
        trial.health.check_validation(measured["val"]["loss"])
