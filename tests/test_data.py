import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from nas_data import (DataConfig, DataError, EpochBatchSampler, build_retrain_data, build_search_data, load,
                      stats_for)
from nas_data.pipeline import Augment, ImageDataset
from tests.conftest import require_cifar


def make_folder(root, split="train", classes=("cat", "dog"), per_class=3, size=8):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_image_folder_directory_and_tarball_agree(tmp_path):
    root = make_folder(tmp_path / "imgs")
    make_folder(root, "test", per_class=1)
    a = load("image_folder", root, "train", cache_dir=tmp_path / "cache")
    assert a.images.shape == (6, 8, 8, 3) and a.classes == ("cat", "dog") and a.labels.tolist() == [0, 0, 0, 1, 1, 1]
    tar = tmp_path / "imgs.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(root / "train", arcname="train")
    b = load("image_folder", tar, "train", cache_dir=tmp_path / "cache")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    with pytest.raises(DataError, match="no images found"):
        load("image_folder", tar, "test", cache_dir=tmp_path / "cache")


def test_decoded_arrays_are_cached(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    first = load("image_folder", root, "train", cache_dir=tmp_path / "cache")
    import nas_data.sources as sources
    monkeypatch.setattr(sources, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = load("image_folder", root, "train", cache_dir=tmp_path / "cache")
    assert np.array_equal(first.images, again.images)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="image_folder", root="/nonexistent/x"), r"expected /nonexistent/x/train/<class>/\*\.jpg.*does not exist"),
    (dict(name="cifar10", root="/nonexistent"), "cifar-10-batches-py.*data.download: true"),
    (dict(name="imagenet16-120", root="/nonexistent"), "ImageNet16 files train_data_batch_1"),
    (dict(name="mnist", root="/x"), "unknown dataset 'mnist'; valid datasets: cifar10, cifar100, image_folder"),
    (dict(name="image_folder", root=None), "needs data.root"),
])
def test_missing_or_unknown_data_gets_one_line_errors(kwargs, match, tmp_path):
    name = kwargs.pop("name")
    with pytest.raises(DataError, match=match) as info:
        load(name, kwargs["root"], "train", cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_undecodable_image_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode image .*broken.jpg"):
        load("image_folder", root, "train", cache_dir=tmp_path / "cache")


def test_data_config_rejects_misspelt_keys_and_falls_back():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) 'datset'.*valid settings: dataset, root"):
        DataConfig.from_mapping({"datset": "cifar10"})
    cfg = DataConfig.from_mapping({"dataset": "image_folder", "root": "/nonexistent", "fallback": "digits"})
    assert cfg.resolved().dataset == "digits"


def test_augmentation_is_a_pure_function_of_the_key():
    data = load("digits", None, "train")
    ds = ImageDataset(data, np.arange(len(data)), Augment(*stats_for("digits", data), crop_padding=2, cutout=4),
                      augment=True, seed=0)
    n = len(ds)
    assert torch.equal(ds[5][0], ds[5][0])                        # same key: same sample
    assert not torch.equal(ds[5][0], ds[5 + 7 * n][0])            # same image, another epoch: new crop/flip
    assert ds[5][1] == ds[5 + 7 * n][1]


def test_epoch_sampler_resumes_mid_stream():
    full = EpochBatchSampler(10, 3, seed=1)
    stream = [b for _ in range(3) for b in full]                   # 3 epochs of 3 batches
    assert sorted(k % 10 for b in stream[:3] for k in b) != list(range(9))  # shuffled
    assert stream[0] != stream[3]                                  # each epoch its own order
    for start in range(len(stream)):
        resumed = EpochBatchSampler(10, 3, seed=1, start_batch=start)
        got = [b for _ in range(4) for b in resumed][: len(stream) - start]
        assert got == stream[start:]


def test_determined_shards_batches_across_ranks():
    from determined.pytorch import DataLoader
    data = load("digits", None, "train")
    ds = ImageDataset(data, np.arange(64), Augment(*stats_for("digits", data)), augment=True, seed=0)
    single = iter(DataLoader(ds, batch_sampler=EpochBatchSampler(64, 4, seed=0)).get_data_loader(repeat=True))
    shards = [iter(DataLoader(ds, batch_sampler=EpochBatchSampler(64, 4, seed=0)).get_data_loader(
        repeat=True, num_replicas=2, rank=r)) for r in range(2)]
    for step in range(20):  # across an epoch boundary
        a, b = next(shards[0]), next(shards[1])
        s0, s1 = next(single), next(single)
        assert torch.equal(a[0], s0[0]) and torch.equal(b[0], s1[0])  # rank r gets every other batch
        assert not torch.equal(a[0], b[0])


def test_ranks_together_take_the_single_slot_global_batches():
    """50 keys, global batch 8: one rank at 8 and two ranks at 4 each take the same 6 global
    batches per epoch (the incomplete one dropped), in the same order, across epochs."""
    from determined.pytorch import DataLoader

    ds = list(range(1000))
    single = DataLoader(ds, batch_sampler=EpochBatchSampler(50, 8, seed=0)).get_data_loader(repeat=True)
    ranks = [DataLoader(ds, batch_sampler=EpochBatchSampler(50, 4, seed=0, world=2)).get_data_loader(
        repeat=True, num_replicas=2, rank=r) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 6
    single, ranks = iter(single), [iter(r) for r in ranks]
    for step in range(14):          # into the third epoch
        together = torch.cat([next(ranks[0]), next(ranks[1])])
        assert torch.equal(together, next(single)), step


def test_search_split_halves_are_disjoint_and_paired():
    d = build_search_data(DataConfig(dataset="digits", subset=200), seed=3)
    w, a = set(d.paired.train.indices.tolist()), set(d.paired.val.indices.tolist())
    assert len(w) == len(a) == 100 and not w & a
    assert set(d.heldout.indices.tolist()) == a
    x, y, xv, yv = d.paired[17]
    assert x.shape == xv.shape == (3, 8, 8) and isinstance(y, int) and isinstance(yv, int)
    x2, y2, xv2, yv2 = d.paired[17]
    assert torch.equal(xv, xv2) and yv == yv2
    d2 = build_search_data(DataConfig(dataset="digits", subset=200), seed=4)
    assert set(d2.paired.train.indices.tolist()) != w


def test_retrain_split_keeps_test_apart():
    r = build_retrain_data(DataConfig(dataset="digits", val_fraction=0.2), seed=0, cutout=4)
    assert not set(r.train.indices.tolist()) & set(r.val.indices.tolist())
    assert len(r.test) > 0 and r.num_classes == 10


def test_real_cifar10_jpegs_from_shared():
    root = require_cifar()
    d = build_search_data(DataConfig(dataset="image_folder", root=str(root), subset=300), seed=0)
    assert d.num_classes == 10 and d.image_shape == (3, 32, 32) and len(d.paired) == 150
    mean, std = stats_for("image_folder", load("image_folder", root, "train"))
    assert np.allclose(mean, (0.4912, 0.4821, 0.4465), atol=2e-3)   # the README's decoded means
