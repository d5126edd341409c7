"""Image datasets as decoded uint8 arrays: CIFAR-10/100 (torchvision's format), image folders
``<root>/{train,test}/<class>/*`` (or a ``.tar.gz`` of that layout), NAS-Bench-201's
ImageNet16-120, and scikit-learn's digits. Decoded arrays are cached on disk."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


class DataError(ValueError):
    """Missing or malformed data; the message says what was expected where."""


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray          # (N, H, W, C) uint8
    labels: np.ndarray          # (N,) int64
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8 or len(self.images) != len(self.labels):
            raise DataError(f"internal: bad image set shapes {self.images.shape} / {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)


Loader = Callable[[Path, str, bool, Optional[int]], ImageSet]
_LOADERS: dict[str, Loader] = {}
# Per-channel (mean, std) of each dataset's training images, in [0, 1] units.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet16-120": ((0.4811, 0.4575, 0.4078), (0.2479, 0.2402, 0.2551)),
}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        _LOADERS[name] = fn
        return fn
    return deco


# retraining datasets indexed and decoded per sample (nas_data/streaming.py), not loaded here
STREAMED = ("imagenet_folder", "imagenet_shards")


def dataset_names() -> tuple[str, ...]:
    """Every dataset name ``data.dataset`` takes: the loaded ones and the streamed ones."""
    return tuple(_LOADERS) + STREAMED


def load(name: str, root: str | os.PathLike | None, split: str, *, download: bool = False,
         image_size: Optional[int] = None, cache_dir: str | os.PathLike | None = None) -> ImageSet:
    """Load ``split`` ('train' or 'test') of dataset ``name``, from the cache when possible."""
    if name not in _LOADERS:
        if name in STREAMED:
            raise DataError(f"data.dataset {name} is streamed: build it with nas_data.build_retrain_data")
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(dataset_names())}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if name != "digits" and not root:
        raise DataError(f"dataset {name!r} needs data.root (a directory or .tar.gz path)")
    root_path = Path(root).expanduser().resolve() if root else Path(".")
    key = _cache_key(name, root_path, split, image_size)
    cache = Path(cache_dir or os.environ.get("NAS_DATA_CACHE", "~/.cache/gaea-nas")).expanduser()
    cached = cache / f"{name}-{split}-{key}.npz"
    if key and cached.exists():
        with np.load(cached) as z:
            return ImageSet(z["images"], z["labels"], tuple(z["classes"].tolist()))
    data = _LOADERS[name](root_path, split, download, image_size)
    if key:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, images=data.images, labels=data.labels, classes=np.array(data.classes))
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only cache location only costs decoding time
    return data


def _cache_key(name: str, root: Path, split: str, image_size: Optional[int]) -> str:
    """Identifies the source files (paths, sizes, mtimes; for digits, scikit-learn's version,
    which saves importing scikit-learn); '' when there is nothing to cache."""
    if name == "digits":
        from importlib.metadata import PackageNotFoundError, version
        try:
            source = version("scikit-learn")
        except PackageNotFoundError:
            return ""
        return hashlib.sha1(f"digits|{source}|{split}|{image_size}".encode()).hexdigest()[:16]
    if not root.exists():
        return ""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())[:200000]
    h = hashlib.sha1(f"{name}|{root}|{split}|{image_size}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ CIFAR
def _cifar(root: Path, split: str, download: bool, num_classes: int) -> ImageSet:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if not download and not (root / folder).is_dir():
        raise DataError(f"dataset cifar{num_classes} expected torchvision's batches at {root / folder}; "
                        "point data.root at their parent or set data.download: true where the network allows")
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except Exception as e:  # torchvision raises RuntimeError / URLError with multi-line text
        raise DataError(f"cifar{num_classes} at {root} could not be read or downloaded: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return ImageSet(np.ascontiguousarray(ds.data), np.asarray(ds.targets, dtype=np.int64), tuple(ds.classes))


register_dataset("cifar10")(lambda root, split, download, size: _cifar(root, split, download, 10))
register_dataset("cifar100")(lambda root, split, download, size: _cifar(root, split, download, 100))


# ------------------------------------------------------------------------ image folder
def _decode(data: bytes, where: str, image_size: Optional[int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot decode image {where}: {e}") from None
    if image_size and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _stack(items: list[tuple[str, str, np.ndarray]], where: str) -> ImageSet:
    if not items:
        raise DataError(f"no images found in {where}")
    classes = tuple(sorted({c for c, _, _ in items}))
    if len(classes) < 2:
        raise DataError(f"{where} has 1 class ({classes[0]!r}): a classifier needs images of at least 2 classes, "
                        "one folder per class")
    index = {c: i for i, c in enumerate(classes)}
    items.sort(key=lambda t: (t[0], t[1]))
    shapes = {im.shape for _, _, im in items}
    if len(shapes) > 1:
        raise DataError(f"images in {where} have different sizes {sorted(shapes)[:3]}...; set data.image_size "
                        "to resize them")
    return ImageSet(np.stack([im for _, _, im in items]), np.array([index[c] for c, _, _ in items], dtype=np.int64),
                    classes)


def _from_tar(tar_path: Path, split: str, image_size: Optional[int]) -> list[tuple[str, str, np.ndarray]]:
    items = []
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for m in tar:
                parts = Path(m.name).parts
                if not m.isfile() or len(parts) < 3 or parts[-3] != split or not m.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                items.append((parts[-2], m.name, _decode(tar.extractfile(m).read(), f"{tar_path}:{m.name}", image_size)))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read tarball {tar_path}: {e}") from None
    return items


@register_dataset("image_folder")
def _image_folder(root: Path, split: str, download: bool, image_size: Optional[int]) -> ImageSet:
    expected = (f"image folder dataset expected {root}/{split}/<class>/*.jpg, a .tar.gz of that layout, or a "
                f"directory holding such .tar.gz files")
    if root.is_file():
        return _stack(_from_tar(root, split, image_size), f"{root} ({split}/)")
    if (root / split).is_dir():
        items = [(p.parent.name, str(p), _decode(p.read_bytes(), str(p), image_size))
                 for p in (root / split).glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES]
        return _stack(items, str(root / split))
    if root.is_dir():
        tars = sorted(p for p in root.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".tar")))
        preferred = [p for p in tars if split in p.name] or tars
        for tar in preferred:
            items = _from_tar(tar, split, image_size)
            if items:
                return _stack(items, f"{tar} ({split}/)")
        raise DataError(f"{expected}; found no {split}/ images under {root}")
    raise DataError(f"{expected}; {root} does not exist")


# -------------------------------------------------------------------- ImageNet16-120
@register_dataset("imagenet16-120")
def _imagenet16(root: Path, split: str, download: bool, image_size: Optional[int]) -> ImageSet:
    names = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise DataError(f"dataset imagenet16-120 expected NAS-Bench-201's ImageNet16 files {', '.join(missing[:3])}"
                        f"{'...' if len(missing) > 3 else ''} in {root}")
    images, labels = [], []
    for n in names:
        try:
            with open(root / n, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data, lab = np.asarray(entry["data"], dtype=np.uint8), np.asarray(entry["labels"], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, EOFError, ValueError) as e:
            raise DataError(f"malformed ImageNet16 file {root / n}: {e}") from None
        keep = lab <= 120
        images.append(data[keep].reshape(-1, 3, 16, 16).transpose(0, 2, 3, 1))
        labels.append(lab[keep] - 1)
    return ImageSet(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels),
                    tuple(str(i) for i in range(120)))


# ----------------------------------------------------------------------------- digits
@register_dataset("digits")
def _digits(root: Path, split: str, download: bool, image_size: Optional[int]) -> ImageSet:
    """scikit-learn's 8x8 digits (shipped with the package): a seeded 80/20 train/test cut,
    grey levels scaled to 0..255 and repeated over 3 channels; resized with ``image_size``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.repeat((d.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, axis=-1)
    if image_size and image_size != 8:
        from PIL import Image
        images = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR))
                           for im in images])
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    idx = order[:cut] if split == "train" else order[cut:]
    return ImageSet(np.ascontiguousarray(images[idx]), d.target[idx].astype(np.int64), tuple(str(i) for i in range(10)))


def stats_for(name: str, train: ImageSet) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization (mean, std) per channel: the published values, else computed from ``train``."""
    if name in STATS:
        return STATS[name]
    x = train.images.reshape(-1, train.images.shape[-1])
    v = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(x.shape[1]):  # exact moments from the 256-bin histogram of each channel
        h = np.bincount(x[:, c], minlength=256).astype(np.float64)
        m = (h * v).sum() / h.sum()
        mean.append(round(float(m), 4))
        std.append(round(float(max(np.sqrt((h * (v - m) ** 2).sum() / h.sum()), 1e-3)), 4))
    return tuple(mean), tuple(std)
