"""The experiment's ``data:`` section as a typed config, and the datasets it builds."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from nas_settings import from_mapping

from .pipeline import Augment, ImageDataset, PairedDataset, split_indices, subset_indices
from .sources import STREAMED, DataError, ImageSet, load, stats_for


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"            # cifar10 | cifar100 | image_folder | imagenet16-120 | digits, or streamed
                                        # (retraining): imagenet_folder | imagenet_shards (nas_data/streaming.py)
    root: Optional[str] = None          # directory or .tar.gz; relative paths are from the working directory
    download: bool = False              # torchvision download (CIFAR only), where the network allows
    fallback: Optional[str] = None      # dataset to use (with a notice) when root does not exist, e.g. digits
    subset: Optional[int] = None        # use a seeded random subset of this many training images
    test_subset: Optional[int] = None   # ... and of this many test images (retraining)
    image_size: Optional[int] = None    # resize image-folder images to this square size
    cache_dir: Optional[str] = None     # decoded-array cache (default $NAS_DATA_CACHE or ~/.cache/gaea-nas)
    num_workers: int = 0                # data loader worker processes
    train_fraction: float = 0.5         # search: share of the training set for the weights (rest: architecture)
    val_fraction: float = 0.1           # retraining: share of the training set held out for model selection
    crop_padding: int = 4               # random-crop padding (0 disables cropping)
    # streamed datasets (imagenet_folder, imagenet_shards): decoded per sample in the loader's workers
    val_labels: Optional[str] = None    # a flat val/ folder: file of '<image> <class>' lines
    crop_size: int = 224                # RandomResizedCrop (training) and center crop (evaluation) size
    resize: int = 256                   # evaluation: shorter side resized to this, then center-cropped
    color_jitter: float = 0.4           # brightness, contrast and saturation jitter (0 disables) ...
    hue: float = 0.2                    # ... and hue (the DARTS ImageNet pipeline's 0.4 / 0.2)
    skip_bad_images: bool = False       # a file that does not decode: stop (default) or skip and count it

    @classmethod
    def from_mapping(cls, values: Optional[Mapping[str, Any]]) -> "DataConfig":
        return from_mapping(cls, values, "the data section")

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            raise ValueError("data.train_fraction and data.val_fraction must be in (0, 1)")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.crop_size < 8 or self.resize < self.crop_size:
            raise ValueError(f"data.crop_size must be >= 8 and data.resize >= crop_size, got {self.crop_size} and "
                             f"{self.resize}")
        if not (0 <= self.color_jitter and 0 <= self.hue <= 0.5):
            raise ValueError("data.color_jitter must be >= 0 and data.hue in [0, 0.5]")

    @property
    def streamed(self) -> bool:
        return self.dataset in STREAMED

    def resolved(self) -> "DataConfig":
        """Apply ``fallback`` when ``root`` is missing."""
        if self.fallback and self.dataset != "digits" and not (self.root and Path(self.root).expanduser().exists()):
            print(f"note: data.root {self.root!r} not found; using the {self.fallback!r} dataset instead",
                  file=sys.stderr)
            return DataConfig(**{**self.__dict__, "dataset": self.fallback, "root": None, "fallback": None})
        return self

    def load(self, split: str) -> ImageSet:
        return load(self.dataset, self.root, split, download=self.download, image_size=self.image_size,
                    cache_dir=self.cache_dir)


@dataclass
class SearchData:
    paired: PairedDataset          # (x_train, y_train, x_val, y_val): weights half x architecture half
    heldout: ImageDataset          # the architecture half, un-augmented: validation metrics
    num_classes: int
    image_shape: tuple[int, int, int]


@dataclass
class RetrainData:
    train: ImageDataset            # augmented (with cutout)
    val: ImageDataset              # held out of the training set: model selection (ASHA)
    test: ImageDataset             # the test split: reported, never used for selection
    num_classes: int
    image_shape: tuple[int, int, int]
    classes: tuple[str, ...] = ()  # class names in label order
    mean: tuple[float, ...] = ()   # per-channel normalization of every split, [0, 1] units
    std: tuple[float, ...] = ()


def _shape(data: ImageSet) -> tuple[int, int, int]:
    n, h, w, c = data.images.shape
    return c, h, w


def build_search_data(cfg: DataConfig, seed: int) -> SearchData:
    """The training split (or its seeded subset), cut into two seeded halves."""
    cfg = cfg.resolved()
    if cfg.streamed:
        raise DataError(f"data.dataset {cfg.dataset} is for retraining: search on CIFAR-10 (or a subset of this data "
                        "as image_folder) and retrain the cell here")
    train = cfg.load("train")
    mean, std = stats_for(cfg.dataset, train)
    aug = Augment(mean, std, crop_padding=cfg.crop_padding)
    idx = subset_indices(len(train), cfg.subset, seed)
    a, b = split_indices(len(idx), cfg.train_fraction, seed)
    if min(len(a), len(b)) < 2:
        raise DataError(f"the search split needs at least 2 images per half; got {len(a)} and {len(b)} "
                        f"from {len(idx)} training images")
    weights_half = ImageDataset(train, idx[a], aug, augment=True, seed=seed)
    arch_half = ImageDataset(train, idx[b], aug, augment=True, seed=seed + 1)
    heldout = ImageDataset(train, idx[b], aug, augment=False, seed=seed)
    return SearchData(PairedDataset(weights_half, arch_half, seed), heldout, len(train.classes), _shape(train))


def build_retrain_data(cfg: DataConfig, seed: int, cutout: int) -> RetrainData:
    cfg = cfg.resolved()
    if cfg.streamed:
        return build_streamed_retrain_data(cfg, seed)
    train, test = cfg.load("train"), cfg.load("test")
    if train.classes != test.classes:
        raise DataError(f"train and test splits of {cfg.dataset} have different classes")
    mean, std = stats_for(cfg.dataset, train)
    idx = subset_indices(len(train), cfg.subset, seed)
    a, b = split_indices(len(idx), 1.0 - cfg.val_fraction, seed)
    test_idx = subset_indices(len(test), cfg.test_subset, seed)
    return RetrainData(
        train=ImageDataset(train, idx[a], Augment(mean, std, cfg.crop_padding, cutout=cutout), augment=True, seed=seed),
        val=ImageDataset(train, idx[b], Augment(mean, std), augment=False, seed=seed),
        test=ImageDataset(test, test_idx, Augment(mean, std), augment=False, seed=seed),
        num_classes=len(train.classes), image_shape=_shape(train), classes=tuple(train.classes),
        mean=tuple(mean), std=tuple(std))


def build_streamed_retrain_data(cfg: DataConfig, seed: int) -> RetrainData:
    """ImageNet-scale retraining data: indexed, decoded per sample. ``val`` is a seeded
    ``val_fraction`` of the training split (model selection, ASHA), ``test`` the dataset's own
    val split (reported)."""
    from .streaming import (IMAGENET_MEAN, IMAGENET_STD, StreamingImages, eval_transform, index_folder,
                            index_shards, train_transform)

    if not cfg.root:
        raise DataError(f"data.dataset {cfg.dataset} needs data.root")
    if cfg.dataset == "imagenet_folder":
        train_index = index_folder(cfg.root, "train")
        test_index = index_folder(cfg.root, "val", classes=train_index.classes, labels_file=cfg.val_labels)
    else:
        train_index = index_shards(cfg.root, "train")
        test_index = index_shards(cfg.root, "val", num_classes=len(train_index.classes))
    idx = subset_indices(len(train_index), cfg.subset, seed)
    a, b = split_indices(len(idx), 1.0 - cfg.val_fraction, seed)
    test_idx = subset_indices(len(test_index), cfg.test_subset, seed)
    evaluate = eval_transform(cfg.resize, cfg.crop_size)

    def images(index, transform, augment):
        return StreamingImages(index, transform, augment, seed, IMAGENET_MEAN, IMAGENET_STD, cfg.skip_bad_images)

    return RetrainData(
        train=images(train_index.subset(idx[a]), train_transform(cfg.crop_size, cfg.color_jitter, cfg.hue), True),
        val=images(train_index.subset(idx[b]), evaluate, False),
        test=images(test_index.subset(test_idx), evaluate, False),
        num_classes=len(train_index.classes), image_shape=(3, cfg.crop_size, cfg.crop_size),
        classes=train_index.classes, mean=IMAGENET_MEAN, std=IMAGENET_STD)
