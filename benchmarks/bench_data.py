"""Images per second of the retraining data pipeline alone (decode cache, seeded crop, flip,
cutout, normalization, collation), as the trial builds it, by number of loader workers.

    .venv/bin/python benchmarks/bench_data.py                  # CIFAR-10 from ../shared
    .venv/bin/python benchmarks/bench_data.py --workers 0 2 4 --batches 100

One JSON line per worker count. A GPU retraining is fed when this exceeds its images/s
(``gpu_check.py``'s ``retrain`` lines).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    p.add_argument("--dataset", default="image_folder")
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cutout", type=int, default=16)
    args = p.parse_args()
    import torch

    from nas_data import DataConfig, EpochBatchSampler, build_retrain_data
    torch.set_num_threads(1)
    cfg = DataConfig(dataset=args.dataset, root=args.root, cache_dir=str(ROOT / ".cache"))
    t0 = time.perf_counter()
    data = build_retrain_data(cfg, seed=0, cutout=args.cutout)
    load_s = time.perf_counter() - t0
    for workers in args.workers:
        sampler = EpochBatchSampler(len(data.train), args.batch, seed=0)
        loader = torch.utils.data.DataLoader(data.train, batch_sampler=sampler, num_workers=workers,
                                             persistent_workers=workers > 0)
        it = iter(loader)
        for _ in range(5):                       # workers start, first batches
            next(it)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            x, y = next(it)
        sec = time.perf_counter() - t0
        print(json.dumps({"bench": "retrain_data", "dataset": args.dataset, "images": len(data.train),
                          "batch": args.batch, "workers": workers, "images_per_s": round(args.batch * args.batches / sec, 1),
                          "load_s": round(load_s, 1), "shape": list(x.shape), "date": time.strftime("%Y-%m-%d")}),
              flush=True)


if __name__ == "__main__":
    main()
