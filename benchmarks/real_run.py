"""A short real search on the CIFAR-10 JPEGs: seconds per step through the real data pipeline
(decoded-array cache, seeded augmentation, paired batches, the trial's DataLoader), per
epoch, and extrapolated to a full search: PC-DARTS 50 epochs at batch 256, NAS-Bench-201 25
epochs at batch 64 (each epoch = one pass over the weights half, 25,000 images).

    python benchmarks/real_run.py [--root ../shared/data/cifar10-jpeg] [--device cpu|cuda] [--steps 4]

One JSON line per space.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETUPS = {  # the papers' search settings
    "pc-darts": dict(space="darts", space_args={"C": 16, "layers": 8, "partial_channels": 4, "edge_normalization": True},
                     batch=256, epochs=50, lr=0.1),
    "nas-bench-201": dict(space="nas-bench-201", space_args={"C": 16, "layers": 5}, batch=64, epochs=25, lr=0.025),
}


def run(name: str, args: argparse.Namespace) -> dict:
    import torch
    from determined.pytorch import DataLoader

    import optimizers
    import search_spaces
    from nas_data import DataConfig, EpochBatchSampler, build_search_data

    setup = SETUPS[name]
    device = torch.device(args.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    data = build_search_data(DataConfig(dataset="image_folder", root=args.root, num_workers=args.workers), seed=0)
    load_s = time.perf_counter() - t0
    batch = args.batch or setup["batch"]
    loader = DataLoader(data.paired, batch_sampler=EpochBatchSampler(len(data.paired), batch, seed=0),
                        num_workers=args.workers, pin_memory=device.type == "cuda").get_data_loader(repeat=True)
    net = search_spaces.create(setup["space"], num_classes=data.num_classes, **setup["space_args"]).to(device)
    optimizers.prepare_supernet(net)  # the memory format the trial uses (channels-last for NAS-Bench-201 on CPU)
    arch = optimizers.create("gaea", net, {"lr": 0.1})
    sgd = torch.optim.SGD(net.weight_parameters(), lr=setup["lr"], momentum=0.9, weight_decay=3e-4)
    params = net.weight_parameters()

    def weight_step():
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    autocast = torch.bfloat16 if args.bf16 else None
    times, it = [], iter(loader)
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        x, y, xv, yv = (v.to(device, non_blocking=True) for v in next(it))
        optimizers.search_step(net, arch, x, y, xv, yv, weight_step=weight_step, autocast=autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    steps_per_epoch = len(data.paired) // batch
    return {"space": name, "device": str(device), "batch": batch, "precision": "bf16" if args.bf16 else "fp32",
            "sec_per_step": round(sec, 3), "steps_per_epoch": steps_per_epoch,
            "sec_per_epoch": round(sec * steps_per_epoch, 1), "epochs": setup["epochs"],
            "full_search_hours": round(sec * steps_per_epoch * setup["epochs"] / 3600, 2),
            "data_load_s": round(load_s, 1), "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
            "peak_cuda_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if device.type == "cuda" else None,
            "steps_timed": args.steps, "threads": torch.get_num_threads(), "workers": args.workers,
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    p.add_argument("--spaces", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None, help="override the papers' batch size")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # one space per process, so the peak memory is its own
        import torch
        torch.set_flush_denormal(True)
        print(json.dumps(run(args.spaces[0], args)), flush=True)
        return
    for name in args.spaces:
        cmd = [sys.executable, __file__, "--worker", "--spaces", name, "--root", args.root, "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--workers", str(args.workers)]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--bf16"] if args.bf16 else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = proc.stdout.strip().splitlines()
        print(out[-1] if proc.returncode == 0 and out else json.dumps(
            {"space": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}), flush=True)


if __name__ == "__main__":
    main()
