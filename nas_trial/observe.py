"""What a run shows of itself: TensorBoard event files, the history a report is drawn from,
and the run's cost, all carried through checkpoints so a resumed run continues them.

TensorBoard: on a cluster through Determined's writer (``det tensorboard start`` and the web
UI read it; Determined writes the training and validation metrics there itself); locally
under ``<output>/tensorboard`` with the same metric tags. At every validation of a search:
one scalar per edge and op (``arch/<cell type>/<dst><-<src>/<op>``; for GDAS and random
search these are the sampling probabilities), PC-DARTS edge weights
(``arch_edge/<cell type>/<dst><-<src>``), ``arch/entropy`` and ``arch/max_weight``, a heatmap
per cell type (``arch_weights/<cell type>``), the cell diagram (``cell``) and the genotype as
text. A retraining shows its cell and genotype once, and its metrics.
"""
from __future__ import annotations

import math
import platform
import resource
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import determined as det
import determined.pytorch  # noqa: F401  (det.pytorch below)
import numpy as np
import torch

import search_spaces


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or isinstance(v, str):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: f for k, v in metrics.items() if (f := _number(v)) is not None}


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most bytes allocated on the device; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux reports KiB


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


# what a search reports for its cell while the architecture weights have not moved (the
# weights-only warm-up): their argmax is a tie, not a result
WARMUP_LABEL = "none yet: weights-only warm-up (arch_warmup_epochs), the architecture has not moved"

class Cost:
    """Wall seconds, seconds per training step (validation and checkpoint time left out),
    images per second, peak memory, device and device-hours, summed over resumed sessions."""

    def __init__(self, global_batch: int, world: int, device: torch.device):
        self.global_batch, self.world, self.device = global_batch, world, device
        self.before = {"wall_s": 0.0, "train_s": 0.0, "steps": 0, "peak_bytes": 0}
        self.t0: Optional[float] = None
        self.first_step = 0
        self.paused_s = 0.0             # this session's validation and checkpoint time
        self._pause_t: Optional[float] = None

    def start(self, step: int) -> None:
        if self.t0 is None:
            self.t0, self.first_step = time.monotonic(), step

    def pause(self) -> None:
        self._pause_t = time.monotonic()

    def resume(self) -> None:
        if self._pause_t is not None:
            self.paused_s += time.monotonic() - self._pause_t
            self._pause_t = None

    def totals(self, step: int) -> dict[str, Any]:
        now = time.monotonic()
        session = (now - self.t0) if self.t0 is not None else 0.0
        paused = self.paused_s + ((now - self._pause_t) if self._pause_t is not None else 0.0)
        wall = self.before["wall_s"] + session
        train = self.before["train_s"] + max(session - paused, 0.0)
        steps = self.before["steps"] + max(step - self.first_step, 0) if self.t0 is not None else self.before["steps"]
        peak = max(self.before["peak_bytes"], peak_memory_bytes(self.device))
        per_step = train / steps if steps else 0.0
        return {"wall_s": wall, "train_s": train, "steps": steps, "s_per_step": per_step,
                "images_per_s": self.global_batch / per_step if per_step else 0.0,
                "peak_memory_gb": peak / 1e9, "peak_bytes": peak, "device": device_name(self.device),
                "device_count": self.world, "device_hours": wall * self.world / 3600.0}

    def metrics(self, step: int) -> dict[str, Any]:
        """``cost_*`` validation metrics (shown in the web UI beside the accuracy)."""
        t = self.totals(step)
        return {f"cost_{k}": t[k] for k in ("wall_s", "s_per_step", "images_per_s", "peak_memory_gb", "device",
                                            "device_count", "device_hours")}

    def state_dict(self, step: int) -> dict[str, Any]:
        t = self.totals(step)
        return {k: t[k] for k in ("wall_s", "train_s", "steps", "peak_bytes")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.before = {k: state.get(k, v) for k, v in self.before.items()}


class Observer(det.pytorch.PyTorchCallback):
    """TensorBoard, history and cost for one trial (rank 0 writes; every rank keeps state)."""

    def __init__(self, trial: Any):
        self.trial = trial
        self.cost = Cost(trial.per_slot * trial.world, trial.world, trial.context.device)
        self.history: dict[str, list] = {"train": [], "validation": [], "arch": []}
        self.chief = trial.rank == 0
        self.on_cluster = (info := det.get_cluster_info()) is not None and info.task_type == "TRIAL"
        self.run_dir: Optional[Path] = None      # set by the local runner: event files go under it
        self._writer = None
        self._cell_written = False

    # -- TensorBoard ---------------------------------------------------------------------
    @property
    def writer(self):
        if self._writer is None and self.chief:
            if self.on_cluster:
                self._writer = self.trial.context.get_tensorboard_writer()
            elif self.run_dir is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def close(self) -> None:
        if self._writer is not None and not self.on_cluster:
            self._writer.close()
        self._writer = None

    # -- callbacks -----------------------------------------------------------------------
    def on_training_start(self) -> None:
        self.cost.start(self.trial.steps)
        if not self.history["arch"] and (arch := self.trial.arch_snapshot()) is not None:
            self.history["arch"].append({"step": self.trial.steps, **arch})     # where the trajectories start

    def on_training_workload_end(self, avg_metrics: dict[str, Any], batch_metrics: Any) -> None:
        step = self.trial.steps
        values = numeric(avg_metrics)
        self.history["train"].append({"step": step, **values})
        if self.writer is not None and not self.on_cluster:   # on a cluster Determined writes these
            for k, v in values.items():
                self.writer.add_scalar("Determined/" + k, v, step)

    def on_validation_start(self) -> None:
        self.cost.pause()

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        step = self.trial.steps
        self.history["validation"].append({"step": step, **numeric(metrics),
                                           **({"genotype": metrics["genotype"]} if "genotype" in metrics else {})})
        arch = self.trial.arch_snapshot()
        if arch is not None:
            self.history["arch"].append({"step": step, **arch})
        writer = self.writer
        if writer is not None:
            if not self.on_cluster:
                for k, v in numeric(metrics).items():
                    writer.add_scalar("Determined/" + (k if k.startswith("val") else "val_" + k), v, step)
            for key, tag in (("arch_entropy", "arch/entropy"), ("arch_max_weight", "arch/max_weight")):
                if (v := _number(metrics.get(key))) is not None:
                    writer.add_scalar(tag, v, step)
            self._write_visuals(writer, step, arch, metrics.get("genotype"))
            writer.flush()
        self.cost.resume()

    def on_checkpoint_save_start(self, checkpoint: dict[str, Any]) -> None:
        self.cost.pause()

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        self.cost.resume()

    def on_trial_shutdown(self) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "cost": self.cost.state_dict(self.trial.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state.get("history", self.history).items()}
        self.cost.load_state_dict(state.get("cost", {}))

    # -- pictures ------------------------------------------------------------------------
    def _write_visuals(self, writer, step: int, arch: Optional[dict], genotype: Optional[str]) -> None:
        try:
            from search_spaces.plot import cell_figure, to_image, weights_figure
        except ImportError as e:        # an image without matplotlib: scalars and text only
            if not self._cell_written:
                print(f"note: no pictures in TensorBoard ({e}); install matplotlib for them", flush=True)
            cell_figure = to_image = weights_figure = None
        if arch is not None:
            space, op_names = arch["space"], arch["op_names"]
            names = search_spaces.edge_names(space)
            for ct, w in arch["cells"].items():
                ops = np.asarray(w["ops"])                                   # (edges, ops)
                for e, edge in enumerate(names):
                    for k, op in enumerate(op_names):
                        writer.add_scalar(f"arch/{ct}/{edge}/{op}", ops[e, k], step)
                for node, weights in enumerate(w.get("edges") or []):
                    dst = node + (2 if space == "darts" else 1)
                    for src, v in enumerate(weights):
                        writer.add_scalar(f"arch_edge/{ct}/{dst}<-{src}", v, step)
                what = "sampling probabilities" if arch["sampled"] else "architecture weights"
                if weights_figure is not None:
                    writer.add_image(f"arch_weights/{ct}", to_image(weights_figure(
                        ops, op_names, names, f"{ct} cell: {what} at step {step}")), step, dataformats="HWC")
        if genotype == WARMUP_LABEL:
            writer.add_text("genotype", genotype, step)
        elif genotype and (arch is not None or not self._cell_written):
            if cell_figure is not None:
                writer.add_image("cell", to_image(cell_figure(search_spaces.parse_genotype(genotype))), step,
                                 dataformats="HWC")
            writer.add_text("genotype", f"`{genotype}`", step)
            self._cell_written = True
