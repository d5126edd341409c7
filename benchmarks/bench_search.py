"""Time and memory of the full GAEA search step, as the search trial runs it.

    python benchmarks/bench_search.py                       # CPU: both spaces, batch 64 and 32, every option
    python benchmarks/bench_search.py --options default     # just the default fp32 bilevel step
    python benchmarks/bench_search.py --device cuda --options default bf16

Each configuration runs in a fresh process (so peak memory is its own): warm-up steps, then
the median of the timed steps of ``optimizers.search_step`` (architecture step on a held-out
batch, weight step on a training batch: SGD momentum 0.9, weight decay 3e-4, clip 5; EG for
the architecture) on random 32x32 inputs, 10 classes. One JSON line per configuration:
seconds per step, images per second (both batches counted), the seconds of the divergence
check's scan of what a checkpoint would hold (run at every reporting boundary: every 10 steps
locally, 100 on a cluster), peak RSS, peak CUDA memory and every option in force.

Spaces: PC-DARTS (C=16, 8 cells, K=4, edge normalization) and NAS-Bench-201 (C=16, N=5).
Options, each measured on its own: ``default`` (fp32, bilevel, eager, the memory format the
supernet prefers on the device: channels-last for NAS-Bench-201 on CPU, NCHW otherwise),
``single_level``, ``bf16`` (autocast), ``channels_last`` and ``contiguous`` (that format forced),
``compile`` (torch.compile).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACES = {
    "pc-darts": ("darts", {"C": 16, "layers": 8, "partial_channels": 4, "edge_normalization": True}),
    "nas-bench-201": ("nas-bench-201", {"C": 16, "layers": 5}),
}
OPTIONS = {
    "default": {},
    "single_level": {"bilevel": False},
    "bf16": {"precision": "bf16"},
    "channels_last": {"channels_last": True},
    "contiguous": {"channels_last": False},
    "compile": {"compile": True},
}


def worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    import optimizers
    import search_spaces

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    opts = {"bilevel": True, "precision": "fp32", "channels_last": None, "compile": False, **OPTIONS[args.option]}
    space, space_args = SPACES[args.space]
    torch.manual_seed(0)
    net = search_spaces.create(space, num_classes=10, **space_args).to(device)
    optimizers.prepare_supernet(net, channels_last=opts["channels_last"], compile=opts["compile"])
    stem = next(p for p in net.parameters() if p.dim() == 4)
    layout = "channels_last" if not stem.is_contiguous() else "contiguous"
    arch = optimizers.create("gaea", net, {"lr": 0.1, "edge_lr": 0.1})
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)

    def weight_step():
        torch.nn.utils.clip_grad_norm_(net.weight_parameters(), 5.0)
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
                torch.randint(0, 10, (args.batch,), generator=g).to(device)) for _ in range(4)]
    autocast = torch.bfloat16 if opts["precision"] == "bf16" else None
    times = []
    for i in range(args.warmup + args.steps):
        (x, y), (xv, yv) = batches[(2 * i) % 4], batches[(2 * i + 1) % 4]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizers.search_step(net, arch, x, y, xv, yv, weight_step=weight_step, bilevel=opts["bilevel"],
                               autocast=autocast, check_finite=False)   # as the trial: a device flag
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    images = args.batch * (2 if opts["bilevel"] else 1)
    # what the divergence check scans at each reporting boundary (nas_trial.health): the
    # tensors a checkpoint would hold, one host transfer per device
    from nas_trial.health import first_non_finite
    scans = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        first_non_finite({"models_state_dict": [net.state_dict()], "optimizers_state_dict": [sgd.state_dict()],
                          "callbacks": {"nas_state": {"extra": {"arch": arch.state_dict()}}}})
        scans.append(time.perf_counter() - t0)
    return {"space": args.space, "batch": args.batch, "device": str(device), "threads": args.threads,
            "sec_per_step": round(sec, 4), "images_per_sec": round(images / sec, 2),
            "divergence_scan_s": round(statistics.median(scans), 4),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
            "peak_cuda_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if device.type == "cuda" else None,
            "steps_timed": args.steps, "warmup": args.warmup, "step_min": round(min(times), 4),
            "step_max": round(max(times), 4), "option": args.option,
            "options": {**opts, "layout": layout, "arch_optimizer": "gaea", "dtype": "float32", **space_args,
                        "input": "3x32x32", "classes": 10},
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spaces", nargs="+", default=list(SPACES), choices=list(SPACES))
    p.add_argument("--batches", nargs="+", type=int, default=[64, 32])
    p.add_argument("--options", nargs="+", default=["default", "single_level", "bf16", "channels_last", "contiguous"],
                   choices=list(OPTIONS))
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--space", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--option", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for space in args.spaces:
        for batch in args.batches:
            for option in args.options:
                cmd = [sys.executable, __file__, "--worker", "--space", space, "--batch", str(batch), "--option", option,
                       "--device", args.device, "--threads", str(args.threads), "--steps", str(args.steps),
                       "--warmup", str(args.warmup)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                    print(json.dumps({"space": space, "batch": batch, "option": option, "device": args.device,
                                      "error": err}), flush=True)
                else:
                    print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
