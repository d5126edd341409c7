"""ImageNet-scale data: an index of where every image is, decoded per sample in the loader's
workers, never all at once.

Two layouts a user already has:

* ``imagenet_folder``: ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``; or a flat
  ``<root>/val/*`` with ``data.val_labels``, a file of ``<image name> <class>`` lines (the
  first token of the second field counts, so Kaggle's ``LOC_val_solution.csv`` works as it is);
* ``imagenet_shards``: tar shards in the WebDataset layout, ``<root>/<split>-*.tar`` (or
  ``<root>/<split>/*.tar``), each image ``<key>.jpg`` (``.jpeg``, ``.png``, ``.webp``) beside
  its ``<key>.cls`` (the class index as text).

The index holds numbers and one byte string of names (numpy arrays: loader workers share
them copy-on-write, where Python lists of strings would be copied into every worker as their
reference counts change). Shards are read by seeking to a member's offset, found once by
reading the tar headers: random access, so the CIFAR path's batch order, slot split and
mid-epoch resume carry over unchanged. (WebDataset's own reader streams shards in order and
cannot resume at a batch; object stores without seeks would need it.)

Decoding: ``torchvision.io.decode_image`` in RGB mode (JPEG, including CMYK and grayscale,
PNG under any name, WebP); augmentation: torchvision's transforms v2, seeded per sample from
``(seed, key)`` as everywhere in ``nas_data``.
"""
from __future__ import annotations

import os
import sys
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .sources import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageIndex:
    """Where each image of a split is: ``names`` (one byte string, cut by ``name_ends``) are
    file paths relative to ``root``, or, for shards, member names read at ``offsets`` /
    ``sizes`` of ``shards[shard_ids[i]]``."""
    root: Path
    classes: tuple[str, ...]
    labels: np.ndarray                       # (N,) int64
    names: bytes
    name_ends: np.ndarray                    # (N,) int64
    shards: tuple[str, ...] = ()
    shard_ids: Optional[np.ndarray] = None   # (N,) int32
    offsets: Optional[np.ndarray] = None     # (N,) int64
    sizes: Optional[np.ndarray] = None       # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        start = int(self.name_ends[i - 1]) if i else 0
        return self.names[start:int(self.name_ends[i])].decode()

    def where(self, i: int) -> str:
        """The file (or shard and member) of image ``i``, for messages."""
        if self.shard_ids is None:
            return str(self.root / self.name(i))
        return f"{self.shards[int(self.shard_ids[i])]}:{self.name(i)}"

    def read(self, i: int) -> bytes:
        if self.shard_ids is None:
            with open(self.root / self.name(i), "rb") as f:
                return f.read()
        with open(self.shards[int(self.shard_ids[i])], "rb") as f:
            f.seek(int(self.offsets[i]))
            return f.read(int(self.sizes[i]))

    def subset(self, indices: np.ndarray) -> "ImageIndex":
        names = [self.name(int(i)).encode() for i in indices]
        return ImageIndex(self.root, self.classes, self.labels[indices], b"".join(names),
                          np.cumsum([len(n) for n in names], dtype=np.int64), self.shards,
                          None if self.shard_ids is None else self.shard_ids[indices],
                          None if self.offsets is None else self.offsets[indices],
                          None if self.sizes is None else self.sizes[indices])


def _pack(names: Sequence[str]) -> tuple[bytes, np.ndarray]:
    encoded = [n.encode() for n in names]
    return b"".join(encoded), np.cumsum([len(n) for n in encoded], dtype=np.int64)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# ------------------------------------------------------------------------------ folders
def index_folder(root: str | os.PathLike, split: str, classes: Optional[Sequence[str]] = None,
                 labels_file: Optional[str] = None) -> ImageIndex:
    """``<root>/<split>/<class>/*`` (or a flat ``<root>/<split>/*`` with ``labels_file``).
    ``classes``: the training split's, which another split must use (one-line errors for a
    class the training split lacks, or an empty class folder)."""
    root = Path(root).expanduser()
    base = root / split
    if not base.is_dir():
        raise DataError(f"{base} does not exist: data.root must hold {split}/<class>/<images> (ImageNet layout)")
    if labels_file is not None and split != "train":
        return _flat_folder(root, split, classes, labels_file)
    dirs = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not dirs:
        raise DataError(f"{base} has no class folders; for a flat {split}/ folder of images give data.val_labels "
                        "(a file of '<image> <class>' lines)")
    names, labels = [], []
    order = list(classes) if classes is not None else dirs
    if classes is not None:
        unknown = sorted(set(dirs) - set(classes))
        if unknown:
            raise DataError(f"{base}: class folder(s) {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} "
                            "are not in train/: every class must have training images")
    for d in dirs:
        files = sorted(f for f in os.listdir(base / d) if _is_image(f))
        if not files:
            raise DataError(f"{base / d} is an empty class folder (no .jpg/.jpeg/.png/.webp files); remove it or "
                            "add its images")
        label = order.index(d)
        names += [f"{split}/{d}/{f}" for f in files]
        labels += [label] * len(files)
    blob, ends = _pack(names)
    return ImageIndex(root, tuple(order), np.asarray(labels, dtype=np.int64), blob, ends)


def _flat_folder(root: Path, split: str, classes: Optional[Sequence[str]], labels_file: str) -> ImageIndex:
    path = Path(labels_file).expanduser()
    if not path.is_absolute() and not path.exists():
        path = root / labels_file
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.val_labels {labels_file}: cannot read it ({e})") from None
    by_stem: dict[str, str] = {}
    for line in lines:
        fields = line.replace(",", " ", 1).split()
        if len(fields) >= 2:
            by_stem[Path(fields[0]).stem] = fields[1]
    files = sorted(f for f in os.listdir(root / split) if _is_image(f))
    if classes is None:
        raise DataError("a flat folder needs the training split's classes")
    names, labels = [], []
    for f in files:
        cls = by_stem.get(Path(f).stem)
        if cls is None:
            raise DataError(f"{root / split / f} has no line in data.val_labels {labels_file}")
        if cls not in classes:
            raise DataError(f"{root / split / f}: class {cls!r} (data.val_labels) has no train/{cls}/ folder")
        names.append(f"{split}/{f}")
        labels.append(classes.index(cls))
    if not names:
        raise DataError(f"{root / split} holds no images")
    blob, ends = _pack(names)
    return ImageIndex(root, tuple(classes), np.asarray(labels, dtype=np.int64), blob, ends)


# ------------------------------------------------------------------------------- shards
def shard_paths(root: Path, split: str) -> list[Path]:
    found = sorted(root.glob(f"{split}-*.tar")) or sorted((root / split).glob("*.tar"))
    if not found:
        raise DataError(f"no {split} shards in {root}: expected {split}-000000.tar ... (or {split}/*.tar) in the "
                        "WebDataset layout")
    return found


def index_shards(root: str | os.PathLike, split: str, num_classes: Optional[int] = None) -> ImageIndex:
    """Every image member of the split's shards with its ``.cls`` label, by reading the tar
    headers once (no image is read)."""
    root = Path(root).expanduser()
    names, labels, shard_ids, offsets, sizes = [], [], [], [], []
    shards = shard_paths(root, split)
    for s, shard in enumerate(shards):
        images: dict[str, tarfile.TarInfo] = {}
        classes: dict[str, int] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = os.path.splitext(member.name)
                    if ext.lower() in IMAGE_EXTENSIONS:
                        images[key] = member
                    elif ext == ".cls":
                        text = tar.extractfile(member).read().decode().strip()
                        try:
                            classes[key] = int(text)
                        except ValueError:
                            raise DataError(f"{shard}:{member.name} holds {text[:20]!r}, not a class index") from None
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{shard} is not a readable tar file ({e})") from None
        if images and not classes:
            raise DataError(f"shard {shard} has images but no .cls labels: each <key>.jpg needs a <key>.cls "
                            "holding its class index")
        for key in sorted(images):
            if key not in classes:
                raise DataError(f"{shard}:{images[key].name} has no {key}.cls label")
            m = images[key]
            names.append(m.name)
            labels.append(classes[key])
            shard_ids.append(s)
            offsets.append(m.offset_data)
            sizes.append(m.size)
    if not names:
        raise DataError(f"the {split} shards in {root} hold no images")
    labels_arr = np.asarray(labels, dtype=np.int64)
    if labels_arr.min() < 0:
        raise DataError(f"the {split} shards hold a negative class index")
    n = num_classes if num_classes is not None else int(labels_arr.max()) + 1
    if num_classes is not None and labels_arr.max() >= num_classes:
        bad = int(labels_arr.max())
        raise DataError(f"the {split} shards hold class {bad}, which no training shard has (classes 0..{n - 1}); "
                        "every class must have training images")
    blob, ends = _pack(names)
    return ImageIndex(root, tuple(str(c) for c in range(n)), labels_arr, blob, ends, tuple(map(str, shards)),
                      np.asarray(shard_ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
                      np.asarray(sizes, dtype=np.int64))


# ------------------------------------------------------------------------------ dataset
def train_transform(crop: int, jitter: float, hue: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """RandomResizedCrop, horizontal flip, colour jitter (the DARTS ImageNet pipeline)."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip()]
    if jitter or hue:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=hue))
    return v2.Compose(steps)


def eval_transform(resize: int, crop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop)])


class StreamingImages(Dataset):
    """Images of an :class:`ImageIndex`, decoded when asked for. Keys beyond ``len`` encode
    the epoch (``key = epoch * len + i``) and seed that sample's augmentation, as
    :class:`nas_data.pipeline.ImageDataset` does.

    A file that does not decode stops the run with one line naming it; with ``skip_bad``
    the next decodable image of the index stands in for it, a warning names the file, and
    ``skipped`` (shared with the loader's workers) counts it."""

    def __init__(self, index: ImageIndex, transform: Callable, augment: bool, seed: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, skip_bad: bool = False):
        self.index, self.transform, self.augment, self.seed = index, transform, augment, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.skip_bad = skip_bad
        self.skipped = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.index)

    def decode(self, i: int) -> torch.Tensor:
        """Image ``i`` as a (3, H, W) uint8 RGB tensor; ``DataError`` naming the file if it
        does not decode."""
        from torchvision.io import ImageReadMode, decode_image

        try:
            data = self.index.read(i)
        except OSError as e:
            raise DataError(f"{self.index.where(i)}: cannot read it ({e.strerror or e})") from None
        try:
            with warnings.catch_warnings():     # 0.29 deprecates its decoders for TorchCodec (README, 'ImageNet')
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = re.sub(r"^.*?\.cpp:\d+, ", "", reason)             # torchvision's source location
            raise DataError(f"{self.index.where(i)} does not decode as an image ({reason[:80]}); remove or replace "
                            "it, or set data.skip_bad_images: true to skip and count such files") from None

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        from .pipeline import _mix

        n = len(self.index)
        i = int(key) % n
        for attempt in range(n):
            j = (i + attempt) % n
            try:
                image = self.decode(j)
                break
            except DataError as e:
                if not self.skip_bad:
                    raise
                if attempt == 0:           # this sample is replaced (by the next image that decodes): count it
                    self.skipped.add_(1)   # shared memory: every worker's count in one place
                    print(f"warning: skipped {e}".split("; remove or replace")[0], file=sys.stderr, flush=True)
        else:
            raise DataError(f"no image of {self.index.root} decodes")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, int(key), 2) if self.augment else 0)
            x = self.transform(image)                                          # (3, crop, crop) uint8
        x = (x.float() / 255.0 - self.mean) / self.std
        return x, int(self.index.labels[j])
