"""Small ImageNet-style datasets made of real CIFAR-10 JPEGs from ../shared, re-encoded at
varied sizes and aspect ratios (some above the crop size, some below), with the files real
ImageNet holds: a CMYK JPEG, a grayscale JPEG and a PNG named ``.JPEG``. The same images as
an ``imagenet_folder`` and as WebDataset shards."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from tests.conftest import require_cifar

CLASSES = ("airplane", "automobile", "bird", "cat", "deer")


def _cifar_jpegs(split: str, per_class: int) -> dict[str, list[bytes]]:
    """The first ``per_class`` JPEGs of each of CLASSES from the CIFAR-10 tarball."""
    root = require_cifar()
    out: dict[str, list[bytes]] = {c: [] for c in CLASSES}
    with tarfile.open(root / f"cifar10-jpeg-{'train' if split == 'train' else 'test'}.tar.gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3 and parts[1] in out and len(out[parts[1]]) < per_class:
                out[parts[1]].append(tar.extractfile(m).read())
            if all(len(v) >= per_class for v in out.values()):
                break
    return out


def _reencode(data: bytes, k: int) -> tuple[bytes, str]:
    """Image ``k`` resized to one of several sizes and aspect ratios; every 7th a PNG named
    .JPEG, every 11th grayscale, every 13th CMYK."""
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    sizes = [(120, 90), (48, 64), (200, 150), (72, 72), (150, 40), (96, 128)]
    im = im.resize(sizes[k % len(sizes)])
    buf = io.BytesIO()
    if k % 7 == 3:
        im.save(buf, format="PNG")
        return buf.getvalue(), "png"
    if k % 11 == 5:
        im = im.convert("L")
    elif k % 13 == 6:
        im = im.convert("CMYK")
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "jpeg"


def make_imagenet(root: Path, train_per_class: int = 24, val_per_class: int = 8) -> dict[str, int]:
    """``root/folder/{train,val}/<class>/*.JPEG`` and ``root/shards/{train,val}-00000N.tar``
    with the same images; returns how many of each kind were written."""
    counts = {"png": 0, "gray": 0, "cmyk": 0, "images": 0}
    k = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        samples = []
        for c, images in _cifar_jpegs(split, per_class).items():
            for n, data in enumerate(images):
                blob, kind = _reencode(data, k)
                counts["png"] += kind == "png"
                counts["gray"] += k % 7 != 3 and k % 11 == 5
                counts["cmyk"] += k % 7 != 3 and k % 11 != 5 and k % 13 == 6
                counts["images"] += 1
                k += 1
                path = root / "folder" / split / c / f"{c}_{n:04d}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(blob)
                samples.append((f"{c}_{n:04d}", blob, CLASSES.index(c)))
        order = np.random.default_rng(0).permutation(len(samples))       # shards mix classes
        per_shard = -(-len(samples) // 3)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        for s in range(3):
            with tarfile.open(root / "shards" / f"{split}-{s:06d}.tar", "w") as tar:
                for i in order[s * per_shard:(s + 1) * per_shard]:
                    key, blob, label = samples[i]
                    for name, payload in ((f"{key}.jpg", blob), (f"{key}.cls", str(label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    return counts
