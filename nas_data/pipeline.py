"""Datasets, augmentation and batch order for search and retraining.

Everything random is a pure function of (seed, epoch, index): the batch order comes from a
seeded permutation per epoch, each sample's crop/flip/cutout from a generator seeded by its
key ``epoch * N + index``. A run can therefore resume mid-epoch exactly (skip the batches
already seen), whatever the number of loader workers.
"""
from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .sources import ImageSet


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over the values)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(_mix(seed, epoch, 1)).permutation(n)


class Augment:
    """Random crop with zero padding, horizontal flip, per-channel normalization, cutout
    (the DARTS CIFAR pipeline), applied to uint8 HWC images with a seeded generator."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_padding: int = 4, flip: bool = True,
                 cutout: int = 0):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.crop_padding, self.flip, self.cutout = crop_padding, flip, cutout

    def __call__(self, image: np.ndarray, rng: Optional[random.Random]) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)          # (C, H, W) uint8
        if rng is not None:
            H, W = x.shape[1:]
            p = self.crop_padding
            if p:
                padded = torch.zeros((x.shape[0], H + 2 * p, W + 2 * p), dtype=x.dtype)
                padded[:, p:p + H, p:p + W] = x
                i, j = rng.randint(0, 2 * p), rng.randint(0, 2 * p)
                x = padded[:, i:i + H, j:j + W]
            if self.flip and rng.random() < 0.5:
                x = x.flip(2)
        x = (x.float() / 255.0 - self.mean) / self.std                              # (C, H, W) float
        if rng is not None and self.cutout:
            H, W = x.shape[1:]
            cy, cx = rng.randrange(H), rng.randrange(W)
            h = self.cutout // 2
            x[:, max(cy - h, 0):min(cy + h, H), max(cx - h, 0):min(cx + h, W)] = 0.0
        return x


class ImageDataset(Dataset):
    """Images of an :class:`ImageSet`, selected by ``indices``. Keys beyond ``len`` encode the
    epoch (``key = epoch * len + i``) and seed that sample's augmentation; ``augment=False``
    gives the plain normalized image."""

    def __init__(self, data: ImageSet, indices: np.ndarray, transform: Augment, augment: bool, seed: int):
        self.data, self.indices = data, np.asarray(indices, dtype=np.int64)
        self.transform, self.augment, self.seed = transform, augment, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        i = self.indices[key % len(self.indices)]
        rng = random.Random(_mix(self.seed, int(key), 2)) if self.augment else None
        return self.transform(self.data.images[i], rng), int(self.data.labels[i])


class PairedDataset(Dataset):
    """Search batches ``(x_train, y_train, x_val, y_val)``: item ``key`` of the training half
    paired with an item of the held-out half drawn from that epoch's permutation of it."""

    def __init__(self, train: ImageDataset, val: ImageDataset, seed: int):
        self.train, self.val, self.seed = train, val, seed
        self._perm: tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, key: int):
        epoch, i = divmod(int(key), len(self.train))
        if self._perm[0] != epoch:
            self._perm = (epoch, permutation(len(self.val), self.seed + 7, epoch))
        j = int(self._perm[1][i % len(self.val)])
        x, y = self.train[key]
        xv, yv = self.val[epoch * len(self.val) + j]
        return x, y, xv, yv


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of keys ``epoch * n + i``, one epoch per ``iter()``: a seeded permutation per
    epoch (or the identity without ``shuffle``). ``start_batch`` skips that many batches of the
    whole stream (resuming mid-run); Determined repeats the sampler and deals its batches
    round-robin to the ``world`` ranks.

    ``batch_size`` is the per-rank batch. Each epoch ends with the last *complete global*
    batch (``world`` per-rank batches): every rank gets ``n // (batch_size * world)`` batches,
    and global step ``s`` covers ``order[s * G:(s + 1) * G]`` (``G`` the global batch) on any
    number of ranks, the images one rank would train on at batch size ``G``."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, start_batch: int = 0,
                 world: int = 1):
        if batch_size < 1 or world < 1 or n < batch_size * world:
            raise ValueError(f"need at least one batch: {n} samples, batch size {batch_size} x {world} rank(s)")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.per_epoch = self.steps_per_epoch(n, batch_size, world) * world
        self.epoch, self.skip = divmod(start_batch, self.per_epoch)

    @staticmethod
    def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
        """Training steps per epoch on every rank: complete global batches only."""
        return n // (batch_size * world)

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        order = permutation(self.n, self.seed, epoch) if self.shuffle else np.arange(self.n)
        base = epoch * self.n
        for b in range(skip, self.per_epoch):
            yield (base + order[b * self.batch_size:(b + 1) * self.batch_size]).tolist()


class ShardBatchSampler(torch.utils.data.Sampler):
    """One rank's share of an evaluation pass: the dataset cut in order into batches of
    ``batch_size`` (the last may be short), as one rank would cut it, and every ``world``-th
    batch from ``rank`` on. ``batch_ids()`` gives their positions in that single-rank order."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1):
        if batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"bad shard: batch size {batch_size}, rank {rank} of {world}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world

    def batch_ids(self) -> range:
        return range(self.rank, -(-self.n // self.batch_size), self.world)

    def __len__(self) -> int:
        return len(self.batch_ids())

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batch_ids():
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.n)))


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of ``size`` of range(n), in random order (datasets are stored class by
    class: a prefix, or consecutive indices, would be one or two classes)."""
    return np.random.default_rng(_mix(seed, 5)).permutation(n)[:size]


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded cut of range(n) into two parts, the first ``fraction`` of them."""
    order = np.random.default_rng(_mix(seed, 3)).permutation(n)
    cut = int(round(fraction * n))
    return np.sort(order[:cut]), np.sort(order[cut:])


def subset_indices(n: int, size: Optional[int], seed: int) -> np.ndarray:
    if size is None or size >= n:
        return np.arange(n)
    if size < 2:
        raise ValueError(f"data.subset must be >= 2, got {size}")
    return np.sort(np.random.default_rng(_mix(seed, 4)).permutation(n)[:size])
