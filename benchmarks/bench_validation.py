"""Seconds per validation pass over a search's held-out half, loader alone (decode cache,
normalization, collation, worker start), built as the trials built it before and after:

* ``det_per_pass``: a ``determined.pytorch.DataLoader``, whose ``__iter__`` builds a new torch
  DataLoader, and new workers, at every validation (``persistent_workers`` cannot help);
* ``torch_once``: one torch DataLoader with persistent workers, built once (what
  ``EveryRankValidation`` keeps now).

    .venv/bin/python benchmarks/bench_validation.py                # quickstart's data, 2 workers
    .venv/bin/python benchmarks/bench_validation.py --subset 20000 --workers 2 --passes 6

The two variants alternate pass by pass in one process; one JSON line per pass and one summary
line per variant (median seconds per pass; the first pass of ``torch_once`` starts its workers).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    p.add_argument("--dataset", default="image_folder")
    p.add_argument("--subset", type=int, default=2000, help="images before the train/held-out split")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--passes", type=int, default=5, help="per variant")
    args = p.parse_args()
    import determined.pytorch as det_torch
    import torch

    from nas_data import DataConfig, ShardBatchSampler, build_search_data
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cfg = DataConfig(dataset=args.dataset, root=args.root, subset=args.subset, cache_dir=str(ROOT / ".cache" / "nas-data"),
                     num_workers=args.workers)
    heldout = build_search_data(cfg, seed=0).heldout
    sampler = ShardBatchSampler(len(heldout), args.batch)
    loaders = {
        "det_per_pass": det_torch.DataLoader(heldout, batch_sampler=sampler, num_workers=args.workers,
                                             generator=torch.Generator(), persistent_workers=args.workers > 0),
        "torch_once": torch.utils.data.DataLoader(heldout, batch_sampler=sampler, num_workers=args.workers,
                                                  generator=torch.Generator(), persistent_workers=args.workers > 0),
    }
    seconds: dict[str, list[float]] = {name: [] for name in loaders}
    for i in range(args.passes):
        for name, loader in loaders.items():
            t0 = time.perf_counter()
            images = sum(len(y) for _, y in loader)
            sec = time.perf_counter() - t0
            seconds[name].append(sec)
            print(json.dumps({"bench": "validation_pass", "variant": name, "pass": i, "images": images,
                              "seconds": round(sec, 3)}), flush=True)
    for name, s in seconds.items():
        print(json.dumps({"bench": "validation_pass_summary", "variant": name, "dataset": args.dataset,
                          "images": len(heldout), "batch": args.batch, "workers": args.workers,
                          "median_s": round(statistics.median(s), 3), "first_s": round(s[0], 3),
                          "later_median_s": round(statistics.median(s[1:]), 3) if len(s) > 1 else None,
                          "date": time.strftime("%Y-%m-%d")}), flush=True)


if __name__ == "__main__":
    main()
