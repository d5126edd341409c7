"""Images per second of the retraining data pipeline alone (decode cache, seeded crop, flip,
cutout, normalization, collation), as the trial builds it, by number of loader workers.

    .venv/bin/python benchmarks/bench_data.py                  # CIFAR-10 from ../shared
    .venv/bin/python benchmarks/bench_data.py --workers 0 2 4 --batches 100

One JSON line per worker count. A GPU retraining is fed when this exceeds its images/s
(``gpu_check.py``'s ``retrain`` lines).

    .venv/bin/python benchmarks/bench_data.py --imagenet       # the streamed ImageNet pipeline, ~5 min

``--imagenet``: the streamed pipeline (``nas_data/streaming.py``) on ImageNet-like files made
from the ../shared CIFAR-10 JPEGs, upscaled to 500x375 (ImageNet's typical size) and saved at
JPEG quality 90: images/s per loader worker at 224 px (decode, RandomResizedCrop, flip, colour
jitter, normalization, collation), folder and shards; the peak RSS of a process iterating
1,000 against 10,000 files (the issue's memory check); and the workers per GPU an 8-GPU node
needs, from the network's images/s per GPU (measured on a GPU; here an estimate, marked so).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


ESTIMATED_GPU_IMAGES_PER_S = 3000   # an estimate, not a measurement: see imagenet()


def _make_files(out: Path, n: int) -> None:
    """``out/folder/{train,val}/<class>/*.JPEG`` (n training files, 500x375) and the same as shards."""
    import io
    import tarfile

    from PIL import Image
    if (out / "done").exists() and int((out / "done").read_text()) >= n:
        return
    src = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "cifar10-jpeg-train.tar.gz"
    shards: dict[str, tarfile.TarFile] = {}
    with tarfile.open(src) as tar:
        files = [m for m in tar.getmembers() if m.isfile()]              # class by class: pick across all classes
        picks = {k: ("train", k // 5) for k in range(0, 5 * n, 5)}
        picks.update({k: ("val", (k - 1) // 250) for k in range(1, len(files), 250)})
        for k in sorted(picks):
            split, i = picks[k]
            m = files[k]
            cls = m.name.split("/")[1]
            im = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB").resize((500, 375))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            path = out / "folder" / split / cls / f"{i:06d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buf.getvalue())
            name = f"{split}-{i // 1000:06d}.tar"
            if name not in shards:
                (out / "shards").mkdir(parents=True, exist_ok=True)
                shards[name] = tarfile.open(out / "shards" / name, "w")
            for member, payload in ((f"{i:06d}.jpg", buf.getvalue()),
                                    (f"{i:06d}.cls", str(CIFAR_CLASSES.index(cls)).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                shards[name].addfile(info, io.BytesIO(payload))
    for t in shards.values():
        t.close()
    (out / "done").write_text(str(n))


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

RSS_SCRIPT = """
import resource, sys
sys.path.insert(0, sys.argv[3])
import numpy as np, torch
from nas_data.streaming import StreamingImages, index_folder, train_transform
torch.set_num_threads(1)
index = index_folder(sys.argv[1], 'train')
index = index.subset(np.arange(int(sys.argv[2])))
data = StreamingImages(index, train_transform(224, 0.4, 0.2), True, 0)
for x, y in torch.utils.data.DataLoader(data, batch_size=64, num_workers=0):
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def imagenet(args) -> None:
    import subprocess

    import torch

    from nas_data import DataConfig, EpochBatchSampler, build_retrain_data
    out = Path(args.imagenet_dir)
    t0 = time.perf_counter()
    _make_files(out, 10_000)
    print(json.dumps({"bench": "imagenet_files", "dir": str(out), "train_files": 10_000, "size": "500x375",
                      "make_s": round(time.perf_counter() - t0, 1)}), flush=True)
    rss = {}
    for n in (1_000, 10_000):
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(out / "folder"), str(n), str(ROOT)],
                              capture_output=True, text=True, check=True)
        rss[n] = int(proc.stdout.split()[-1])
    print(json.dumps({"bench": "imagenet_loader_rss", "peak_rss_mb": {str(k): round(v / 1024, 1) for k, v in rss.items()},
                      "growth_percent": round(100 * (rss[10_000] / rss[1_000] - 1), 2)}), flush=True)
    per_worker = None
    for layout in ("folder", "shards"):
        cfg = DataConfig(dataset=f"imagenet_{layout}", root=str(out / layout), subset=2_000)
        data = build_retrain_data(cfg, seed=0, cutout=0)
        for workers in args.workers:
            sampler = EpochBatchSampler(len(data.train), args.batch, seed=0)
            loader = torch.utils.data.DataLoader(data.train, batch_sampler=sampler, num_workers=workers,
                                                 persistent_workers=workers > 0)
            it = iter(loader)
            next(it)
            t0 = time.perf_counter()
            n = 0
            for _ in range(min(args.batches, len(sampler) - 1)):
                x, y = next(it)
                n += len(y)
            ips = n / (time.perf_counter() - t0)
            if workers == 1 and layout == "folder":
                per_worker = ips
            print(json.dumps({"bench": "imagenet_data", "layout": layout, "workers": workers, "batch": args.batch,
                              "images_per_s": round(ips, 1), "shape": list(x.shape),
                              "date": time.strftime("%Y-%m-%d")}), flush=True)
    if per_worker:
        measured = torch.cuda.is_available()
        gpu = _gpu_images_per_s() if measured else ESTIMATED_GPU_IMAGES_PER_S
        print(json.dumps({"bench": "imagenet_workers_per_gpu", "gpu_images_per_s": round(gpu),
                          "gpu_images_per_s_is": "measured" if measured else
                          "an estimate (no GPU here): a MobileNet-class network trains ~1,000 images/s on a V100 "
                          "in mixed precision, an H100 ~3x that",
                          "images_per_s_per_worker": round(per_worker, 1),
                          "workers_per_gpu": math.ceil(gpu / per_worker),
                          "workers_per_8_gpu_node": 8 * math.ceil(gpu / per_worker),
                          "cpu": os.cpu_count()}), flush=True)


def _gpu_images_per_s() -> float:
    """Training images/s of the GAEA ImageNet cell (C 48, 14 cells) on one GPU, batch 128,
    bf16 and channels-last, as the ImageNet YAML runs it."""
    import torch
    import torch.nn.functional as F

    import search_spaces
    net = search_spaces.create_network(search_spaces.parse_genotype("GAEA_PC_DARTS_IMAGENET"), C=48, layers=14,
                                       num_classes=1000, variant="imagenet").cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(128, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (128,), device="cuda")
    for step in range(13):
        if step == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, aux = net(x)
            loss = F.cross_entropy(logits.float(), y) + 0.4 * F.cross_entropy(aux.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return 10 * 128 / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    p.add_argument("--dataset", default="image_folder")
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cutout", type=int, default=16)
    p.add_argument("--imagenet", action="store_true", help="the streamed ImageNet pipeline instead")
    p.add_argument("--imagenet-dir", default="/tmp/bench-imagenet", help="where the ImageNet-like files are made")
    args = p.parse_args()
    if args.imagenet:
        return imagenet(args)
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
