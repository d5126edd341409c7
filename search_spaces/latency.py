"""Latency tables: an additive latency model of a target network, measured on a device.

Each op is timed at every (channels, stride, input size) the target network runs it at,
forward only, in eval mode, at the batch size and precision asked (warm-up, then the median
of ``repeats``); an op on an edge costs the sum over the cells of its type. The rest of the
network (stem, cell preprocessing, concatenations, classifier) is the median, over
``calibration`` random cells, of the whole network's measured latency minus its ops'. The
model's error is then measured on ``genotypes`` further random cells, whole networks timed
the same way: the mean absolute percentage error, saved in the table.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from .cost import CostTable, TargetNetwork, additive_table, random_genotype
from .ops import create_op

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _timer(device: torch.device) -> Callable[[Callable[[], None], int, int], float]:
    def time_ms(run: Callable[[], None], warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            run()
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                run()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    return time_ms


@torch.no_grad()
def network_latency(net: nn.Module, target: TargetNetwork, batch: int, dtype: torch.dtype, device: torch.device,
                    warmup: int, repeats: int) -> float:
    """Median forward latency (ms) of a whole network."""
    net = net.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 3, target.image_size, target.image_size, device=device, dtype=dtype)
    return _timer(device)(lambda: net(x), warmup, repeats)


def measure_table(target: TargetNetwork, *, batch: int = 1, precision: str = "fp32", device: str = "cpu",
                  warmup: int = 5, repeats: int = 20, calibration: int = 4, genotypes: int = 20, seed: int = 0,
                  log: Optional[Callable[[str], None]] = None) -> CostTable:
    """Measure a latency table of ``target`` on ``device`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if batch < 1 or repeats < 1 or warmup < 0 or calibration < 1 or genotypes < 1:
        raise ValueError("batch, repeats, calibration and genotypes must be >= 1, warmup >= 0")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device here")
    dtype = PRECISIONS[precision]
    time_ms = _timer(dev)
    cache: dict[tuple, float] = {}

    @torch.no_grad()
    def op_ms(op: str, C: int, stride: int, H: int) -> float:
        key = (op, C, stride, H)
        if key not in cache:
            if op == "none":
                cache[key] = 0.0          # the discrete network skips it
            else:
                module = create_op(op, C, stride).to(device=dev, dtype=dtype).eval()
                x = torch.randn(batch, C, H, H, device=dev, dtype=dtype)
                cache[key] = time_ms(lambda: module(x), warmup, repeats)
        return cache[key]

    table = additive_table(target, "latency_ms", op_ms)
    if log:
        log(f"timed {len(cache)} op configurations")
    g = torch.Generator().manual_seed(seed)

    def whole(n: int) -> list[tuple[float, float]]:
        out = []
        for _ in range(n):
            genotype = random_genotype(target, g)
            measured = network_latency(target.build(genotype), target, batch, dtype, dev, warmup, repeats)
            out.append((measured, table.cost(genotype)))
        return out

    base = statistics.median(m - ops for m, ops in whole(calibration))
    held_out = whole(genotypes)
    errors = [abs(base + ops - m) / m * 100 for m, ops in held_out]
    measured = {
        "device": dev.type, "device_name": device_name(dev), "batch": batch, "precision": precision,
        "warmup": warmup, "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "error": {"mape_percent": round(statistics.mean(errors), 3), "max_percent": round(max(errors), 3),
                  "genotypes": genotypes, "calibration_genotypes": calibration,
                  "measured_ms": [round(m, 4) for m, _ in held_out],
                  "predicted_ms": [round(base + ops, 4) for _, ops in held_out]}}
    return CostTable("latency_ms", target, table.table, base, measured)
