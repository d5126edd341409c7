"""Latency tables: an additive latency model of a target network, measured on a device.

Each op is timed at every (channels, stride, input size) the target network runs it at,
forward only, in eval mode, at the batch size and precision asked (warm-up, then the median
of ``repeats``, in each of ``rounds`` rounds that time every op and network once, the median
over rounds kept); an op on an edge costs the sum over the cells of its type. The rest of the
network (stem, cell preprocessing, concatenations, classifier) and one factor on every op
(ops timed alone run at another speed than inside a network: caches, the allocator) are
fitted to ``calibration`` random cells' whole networks: ``measured = base + scale * sum of
the cell's op times``, least squares for the scale, the median offset for the base. The
model's error is then measured on ``genotypes`` further random cells, whole networks timed
the same way: the mean absolute percentage error, saved in the table.

On the CPU, denormal floats are flushed to zero while timing: the untrained networks' random
weights shrink some cells' activations into denormals, which x86 computes 10-40x slower
(a 15-cell NAS-Bench-201 network timed 28 ms with them, 11 ms without), a cost a trained
network does not have.
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


def measure_table(target: TargetNetwork, *, batch: int = 1, precision: str = "fp32", device: str = "cpu",
                  warmup: int = 5, repeats: int = 10, rounds: int = 3, calibration: int = 8, genotypes: int = 20,
                  seed: int = 0,
                  log: Optional[Callable[[str], None]] = None) -> CostTable:
    """Measure a latency table of ``target`` on ``device`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if min(batch, repeats, rounds, calibration, genotypes) < 1 or warmup < 0:
        raise ValueError("batch, repeats, rounds, calibration and genotypes must be >= 1, warmup >= 0")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device here")
    dtype = PRECISIONS[precision]
    torch.set_flush_denormal(True)          # see the module docstring (left on: torch offers no way to read it)
    return _measure(target, batch, dtype, precision, dev, warmup, repeats, rounds, calibration, genotypes, seed, log)


def _measure(target: TargetNetwork, batch: int, dtype: torch.dtype, precision: str, dev: torch.device, warmup: int,
             repeats: int, rounds: int, calibration: int, genotypes: int, seed: int,
             log: Optional[Callable[[str], None]]) -> CostTable:
    time_ms = _timer(dev)
    configs: dict[tuple, Optional[Callable[[], None]]] = {}

    def collect(op: str, C: int, stride: int, H: int) -> float:
        key = (op, C, stride, H)
        if key not in configs:
            configs[key] = None if op == "none" else _op_run(op, C, stride, H, batch, dtype, dev)
        return 0.0

    additive_table(target, "latency_ms", collect)            # which op configurations the network runs
    g = torch.Generator().manual_seed(seed)
    cells = [random_genotype(target, g) for _ in range(calibration + genotypes)]
    nets = [_network_run(target.build(c), target, batch, dtype, dev) for c in cells]
    op_samples: dict[tuple, list[float]] = {k: [] for k in configs}
    net_samples: list[list[float]] = [[] for _ in cells]
    for r in range(rounds):       # every op and network once per round: drift in the machine's speed spreads evenly
        for key, run in configs.items():
            op_samples[key].append(0.0 if run is None else time_ms(run, warmup, repeats))
        for samples, run in zip(net_samples, nets):
            samples.append(time_ms(run, warmup, repeats))
        if log:
            log(f"round {r + 1}/{rounds}: timed {len(configs)} op configurations and {len(nets)} networks")
    op_ms = {k: statistics.median(v) for k, v in op_samples.items()}
    isolated = additive_table(target, "latency_ms", lambda op, C, stride, H: op_ms[(op, C, stride, H)])
    whole = [(statistics.median(v), isolated.cost(c) - isolated.base) for v, c in zip(net_samples, cells)]
    base, scale = _fit(whole[:calibration])
    table = additive_table(target, "latency_ms", lambda op, C, stride, H: scale * op_ms[(op, C, stride, H)])
    held_out = [(m, scale * ops) for m, ops in whole[calibration:]]
    errors = [abs(base + ops - m) / m * 100 for m, ops in held_out]
    measured = {
        "device": dev.type, "device_name": device_name(dev), "batch": batch, "precision": precision,
        "warmup": warmup, "repeats": repeats, "rounds": rounds, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "op_scale": round(scale, 4),
        "error": {"mape_percent": round(statistics.mean(errors), 3), "max_percent": round(max(errors), 3),
                  "genotypes": genotypes, "calibration_genotypes": calibration,
                  "cells": [c.to_str() for c in cells[calibration:]],
                  "measured_ms": [round(m, 4) for m, _ in held_out],
                  "predicted_ms": [round(base + ops, 4) for _, ops in held_out]}}
    return CostTable("latency_ms", target, table.table, base, measured)


def measure_network(target: TargetNetwork, genotype, *, batch: int = 1, precision: str = "fp32",
                    device: str = "cpu", warmup: int = 5, repeats: int = 10, rounds: int = 3) -> float:
    """The measured latency (ms) of ``genotype``'s whole network, timed as ``measure_table``
    times its networks (median over rounds of the median of ``repeats``)."""
    torch.set_flush_denormal(True)
    dev = torch.device(device)
    run = _network_run(target.build(genotype), target, batch, PRECISIONS[precision], dev)
    time_ms = _timer(dev)
    return statistics.median(time_ms(run, warmup, repeats) for _ in range(rounds))


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``measured = base + scale * ops`` over (measured, sum of the isolated op
    times) pairs; ``scale`` 1 and the median offset when the cells' op sums do not vary."""
    xs = [ops for _, ops in points]
    ys = [m for m, _ in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    scale = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 1.0
    if not scale > 0:
        scale = 1.0
    return statistics.median(y - scale * x for x, y in zip(xs, ys)), scale


def _op_run(op: str, C: int, stride: int, H: int, batch: int, dtype: torch.dtype,
            dev: torch.device) -> Callable[[], None]:
    module = create_op(op, C, stride).to(device=dev, dtype=dtype).eval()
    x = torch.randn(batch, C, H, H, device=dev, dtype=dtype)

    @torch.no_grad()
    def run() -> None:
        module(x)

    return run


def _network_run(net: nn.Module, target: TargetNetwork, batch: int, dtype: torch.dtype,
                 dev: torch.device) -> Callable[[], None]:
    net = net.to(device=dev, dtype=dtype).eval()
    x = torch.randn(batch, 3, target.image_size, target.image_size, device=dev, dtype=dtype)

    @torch.no_grad()
    def run() -> None:
        net(x)

    return run
