"""The prepared GPU check: run it first whenever a CUDA machine is available (about 8 minutes
on one H200), then put its numbers in benchmarks/README.md with the date and the hardware.

    python benchmarks/gpu_check.py --out gpu_check.jsonl

Needs nothing beyond the repository (random inputs). One JSON line per check, printed and
appended to ``--out`` as it finishes, so a run cut short keeps what it measured:

1. ``env``: torch, CUDA, the device;
2. ``tests``: the CUDA tests and the CPU proofs of the CUDA path (pytest);
3. ``sync``: a GAEA step (bilevel and single-level, and bilevel under a parameter budget;
   both spaces, the papers' sizes) under
   ``torch.cuda.set_sync_debug_mode("error")``, as the trial runs it (finite flag and
   metrics on the device);
4. ``parity``: fp32 against bf16 autocast, same weights and batch: losses and the
   architecture gradient's cosine similarity;
5. ``speed``: seconds per step and peak memory (``benchmarks/bench_search.py --device cuda``)
   at the papers' batch sizes (PC-DARTS 256, NAS-Bench-201 64), fp32 and bf16, eager and
   compiled, each in its own process with a time limit;
6. ``retrain``: images per second of DARTS_V2 retraining (C 36, 20 cells, batch 96),
   fp32 and bf16 + channels-last;
7. ``latency``: latency tables of both spaces on the GPU (batch 1 and 64) and the additive
   model's error against whole networks;
8. ``extrapolated``: full-search and retraining hours from the measured steps (training
   steps only; validation and data loading left out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER = {  # space: (bench_search name, batch, steps per epoch, epochs)
    "pc-darts": ("pc-darts", 256, 25_000 // 256, 50),          # half of CIFAR-10's training set per level
    "nas-bench-201": ("nas-bench-201", 64, 40_000 // 64, 25),  # ERM on 80% of CIFAR-10's training set
}


DEVICE = "cuda"          # a smoke run of the code elsewhere may set "cpu"


class Results:
    def __init__(self, path: Path):
        self.path = path
        self.lines: list[dict] = []

    def add(self, record: dict) -> None:
        record = {"check": record.pop("check"), **record, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.lines.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def env(results: Results) -> None:
    import torch
    results.add({"check": "env", "torch": torch.__version__, "cuda": torch.version.cuda,
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                 "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None})


def tests(results: Results, timeout: int) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "tests/test_search_spaces.py::test_supernets_and_networks_on_cuda", "tests/test_gpu_path.py", "-m", "not slow"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        results.add({"check": "tests", "rc": r.returncode, "tail": r.stdout.strip().splitlines()[-1:]})
    except subprocess.TimeoutExpired:
        results.add({"check": "tests", "rc": None, "error": f"timed out after {timeout} s"})


def _search(space: str, device, batch: int, seed: int = 0):
    from benchmarks.step_audit import search_setup
    return search_setup(space, "gaea", device, batch, seed)


def sync(results: Results) -> None:
    import torch

    import optimizers
    from nas_trial.train_metrics import DeviceMeans
    from optimizers.budget import CostBudget
    from search_spaces.cost import TargetNetwork, count_table
    for space, (_, batch, _, _) in PAPER.items():
        for bilevel, budgeted in ((True, False), (False, False), (True, True)):
            net, arch, weight_step, x, y = _search(space, torch.device(DEVICE), batch)
            if budgeted:        # a parameter budget: penalty, dual step and the cell's cost on the device
                table = count_table(TargetNetwork.default(net.space), "params")
                arch.budget = CostBudget(table, table.cheapest(net.op_names)[0] * 1.5, op_names=net.op_names,
                                         device=torch.device(DEVICE))
            means = DeviceMeans()
            record = {"check": "sync", "space": space,
                      "form": ("bilevel" if bilevel else "single_level") + ("+budget" if budgeted else "")}
            try:
                for step in range(3):          # the first two warm up (allocator, optimizer state)
                    if step == 2:
                        torch.cuda.synchronize()
                        torch.cuda.set_sync_debug_mode("error")
                    r = optimizers.search_step(net, arch, x, y, x, y, bilevel=bilevel, weight_step=weight_step,
                                               check_finite=False)
                    means.update({"loss": r.loss, "train_accuracy": r.accuracy, "arch_loss": r.arch_loss})
                record["ok"] = True
            except RuntimeError as e:
                record.update(ok=False, error=str(e)[:300])
            finally:
                torch.cuda.set_sync_debug_mode("default")
            results.add(record)


def parity(results: Results) -> None:
    import torch
    import torch.nn.functional as F
    for space, (_, batch, _, _) in PAPER.items():
        out = {}
        for precision in ("fp32", "bf16"):
            net, arch, _, x, y = _search(space, torch.device(DEVICE), batch)
            weights = arch.weights()
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = net(x, weights)
            loss = F.cross_entropy(logits.float(), y)
            grads = torch.autograd.grad(loss, list(arch.parameters()))
            out[precision] = (loss.item(), torch.cat([g.flatten() for g in grads]).float())
        cos = F.cosine_similarity(out["fp32"][1], out["bf16"][1], dim=0).item()
        results.add({"check": "parity", "space": space, "loss_fp32": out["fp32"][0], "loss_bf16": out["bf16"][0],
                     "arch_grad_cosine": round(cos, 5)})


def speed(results: Results, options: list[str], timeout: int) -> None:
    for space, (bench_name, batch, _, _) in PAPER.items():
        for option in options:
            cmd = [sys.executable, "benchmarks/bench_search.py", "--device", "cuda", "--spaces", bench_name,
                   "--batches", str(batch), "--options", option, "--steps", "10", "--warmup", "3"]
            try:
                r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
                lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
                for rec in lines:
                    results.add({"check": "speed", **rec})
                if not lines:
                    results.add({"check": "speed", "space": space, "option": option, "error": r.stderr[-300:]})
            except subprocess.TimeoutExpired:
                results.add({"check": "speed", "space": space, "option": option,
                             "error": f"timed out after {timeout} s"})


def retrain(results: Results) -> None:
    import torch
    import torch.nn.functional as F

    import search_spaces
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        torch.manual_seed(0)
        net = search_spaces.create_network(search_spaces.parse_genotype("DARTS_V2"), C=36, layers=20,
                                           num_classes=10, auxiliary=True).to(DEVICE)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net.to(memory_format=fmt).train()
        net.drop_path_prob = 0.2
        torch.backends.cudnn.benchmark = True
        opt = torch.optim.SGD(net.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        x = torch.randn(96, 3, 32, 32, device=DEVICE).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (96,), device=DEVICE)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(25):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits, aux = net(x)
            loss = F.cross_entropy(logits.float(), y) + 0.4 * F.cross_entropy(aux.float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= 5:
                times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]
        results.add({"check": "retrain", "genotype": "DARTS_V2", "precision": precision,
                     "channels_last": channels_last, "sec_per_step": round(sec, 4), "images_per_s": round(96 / sec, 1),
                     "peak_cuda_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                     "hours_600_epochs": round(600 * (50_000 // 96) * sec / 3600, 2)})


def latency(results: Results) -> None:
    """Latency tables on the GPU (``python -m search_spaces profile --device cuda``) and their
    error against whole networks, both spaces, batch 1 and 64."""
    from search_spaces.cost import TargetNetwork
    from search_spaces.latency import measure_table
    for space in ("nas-bench-201", "darts"):
        for batch in (1, 64):
            t0 = time.time()
            table = measure_table(TargetNetwork.default(space), batch=batch, device=DEVICE, rounds=2)
            m = table.measured
            results.add({"check": "latency", "space": space, "batch": batch, "device_name": m["device_name"],
                         "base_ms": round(table.base, 3), "op_scale": m["op_scale"],
                         "mape_percent": m["error"]["mape_percent"], "max_percent": m["error"]["max_percent"],
                         "seconds": round(time.time() - t0, 1)})


def extrapolate(results: Results) -> None:
    for space, (bench_name, batch, per_epoch, epochs) in PAPER.items():
        for rec in results.lines:
            if rec["check"] == "speed" and rec.get("space") == bench_name and "sec_per_step" in rec:
                minutes = per_epoch * epochs * rec["sec_per_step"] / 60
                results.add({"check": "extrapolated", "space": space, "option": rec["option"], "batch": batch,
                             "steps": per_epoch * epochs, "search_minutes": round(minutes, 1)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.jsonl"))
    p.add_argument("--speed-timeout", type=int, default=150, help="seconds per speed configuration")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("error: no CUDA device; this script is for a GPU machine", file=sys.stderr)
        sys.exit(2)
    results = Results(Path(args.out))
    env(results)
    tests(results, timeout=120)
    sync(results)
    parity(results)
    speed(results, ["default", "bf16", "single_level"], args.speed_timeout)
    retrain(results)
    latency(results)
    speed(results, ["compile"], args.speed_timeout)
    extrapolate(results)


if __name__ == "__main__":
    main()
