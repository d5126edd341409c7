"""Retraining at ImageNet scale on real JPEGs: an ImageNet-style folder and WebDataset shards
made from ../shared CIFAR-10 images (varied sizes, CMYK, grayscale, a PNG named .JPEG), the
streaming pipeline, the DARTS ImageNet recipe, and the one-line errors of messy data."""
import json
import subprocess
import sys
import tarfile

import pytest
import torch

from nas_data.sources import DataError
from nas_data.streaming import StreamingImages, eval_transform, index_folder, index_shards, train_transform
from tests.helpers import (ROOT, checkpoints, load_state, run_in_process, run_model_def, straight_and_resumed,
                           write_config)
from tests.imagenet_files import CLASSES, make_imagenet

CROP = {"crop_size": 96, "resize": 110}       # the auxiliary head needs >= 193 px: left out at this size


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    counts = make_imagenet(root)
    return root, counts


def _hp(**kw):
    return {"genotype": "GAEA_PC_DARTS_IMAGENET", "variant": "imagenet", "global_batch_size": 8, "init_channels": 8,
            "layers": 3, "epochs": 2, "learning_rate": 0.05, "auxiliary": False, "warmup_epochs": 1, "ema_decay": 0.9, "seed": 0, **kw}


def _data(root, layout, **kw):
    return {"dataset": f"imagenet_{layout}", "root": str(root / layout), "val_fraction": 0.1, **CROP, **kw}


def test_every_messy_file_decodes_to_rgb(imagenet):
    root, counts = imagenet
    assert counts["png"] and counts["gray"] and counts["cmyk"]
    for index in (index_folder(root / "folder", "train"), index_shards(root / "shards", "train")):
        data = StreamingImages(index, eval_transform(110, 96), augment=False, seed=0)
        for i in range(len(index)):
            image = data.decode(i)
            assert image.shape[0] == 3 and image.dtype == torch.uint8
            x, y = data[i]
            assert x.shape == (3, 96, 96) and 0 <= y < len(CLASSES)


def test_folder_and_shards_index_the_same_images(imagenet):
    root, _ = imagenet
    folder, shards = index_folder(root / "folder", "train"), index_shards(root / "shards", "train")
    assert folder.classes == CLASSES and len(folder) == len(shards) == 24 * len(CLASSES)
    by_name = {folder.name(i).split("/")[-1].split(".")[0]: (folder.read(i), int(folder.labels[i]))
               for i in range(len(folder))}
    for i in range(len(shards)):
        assert by_name[shards.name(i).split(".")[0]] == (shards.read(i), int(shards.labels[i]))


def test_augmentation_is_a_function_of_seed_and_key(imagenet):
    root, _ = imagenet
    data = StreamingImages(index_folder(root / "folder", "train"), train_transform(96, 0.4, 0.2), True, seed=3)
    a, b = data[7 + 3 * len(data)], data[7 + 3 * len(data)]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], data[7][0])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folder", "shards"])
def test_imagenet_retraining_trains_and_validates_with_top5_and_ema(tmp_path, imagenet, layout):
    """Shards are decoded in two loader workers (in a process of its own: workers are torn
    down with it)."""
    root, _ = imagenet
    workers = 2 if layout == "shards" else 0
    cfg = write_config(tmp_path / "exp.yaml", _hp(), _data(root, layout, num_workers=workers))
    if workers:
        proc = run_model_def(str(cfg), "--max-batches", "6", "--output", str(tmp_path / "o"))
    else:
        proc = run_in_process(str(cfg), "--max-batches", "6", "--output", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "val_top5_accuracy" in proc.stdout and "test_top5_accuracy" in proc.stdout
    assert "val_ema_accuracy" in proc.stdout and "test_ema_top5_accuracy" in proc.stdout
    state = load_state(checkpoints(tmp_path / "o")[6])
    assert "ema" in json.dumps(list(state["callbacks"]["nas_state"]["extra"].keys()))


@pytest.mark.slow
def test_imagenet_resume_mid_epoch_is_exact(tmp_path, imagenet):
    """Cut at batch 5 of a 13-batch epoch, resumed to 16: the weights and the EMA weights
    equal 16 batches straight (single process, shards)."""
    root, _ = imagenet
    cfg = write_config(tmp_path / "exp.yaml", _hp(), _data(root, "shards"))
    runs = straight_and_resumed(cfg, 5, 16, tmp_path, "--checkpoint-every", "5", "--validate-every", "100")
    a, b = (load_state(checkpoints(r)[16]) for r in runs)
    for k, v in a["models_state_dict"][0].items():
        assert torch.equal(v, b["models_state_dict"][0][k]), k
    ema_a, ema_b = (s["callbacks"]["nas_state"]["extra"]["ema"] for s in (a, b))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


@pytest.mark.slow
def test_imagenet_resume_mid_epoch_is_exact_on_two_processes(tmp_path, imagenet):
    root, _ = imagenet
    cfg = write_config(tmp_path / "exp.yaml", _hp(), _data(root, "folder"))
    common = ["--checkpoint-every", "3", "--validate-every", "100"]
    for out, args in (("a", ["--max-batches", "8"]), ("b", ["--max-batches", "3"]),
                      ("b", ["--max-batches", "8", "--resume", str(tmp_path / "b")])):
        proc = run_model_def(str(cfg), *args, "--output", str(tmp_path / out), *common, nproc=2, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_state(checkpoints(tmp_path / r)[8]) for r in "ab")
    for k, v in a["models_state_dict"][0].items():
        assert torch.equal(v, b["models_state_dict"][0][k]), k


# -------------------------------------------------------------------- messy data
def _one_line(proc, message):
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture()
def messy(tmp_path, imagenet):
    import shutil

    root, _ = imagenet
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    return copy


@pytest.mark.parametrize("case,message", [
    ("corrupt", "does not decode as an image"),
    ("corrupt_in_a_worker", "does not decode as an image"),
    ("empty_class", "is an empty class folder"),
    ("val_only_class", "are not in train/"),
    ("unlabelled_shard", "has images but no .cls labels"),
])
def test_messy_data_is_one_line(tmp_path, messy, case, message):
    layout = "shards" if case == "unlabelled_shard" else "folder"
    if case.startswith("corrupt"):
        bad = sorted((messy / "folder" / "train" / "bird").iterdir())[0]
        bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
        message = f"{bad} {message}"
    elif case == "empty_class":
        (messy / "folder" / "train" / "emu").mkdir()
    elif case == "val_only_class":
        (messy / "folder" / "val" / "emu").mkdir()
        (messy / "folder" / "val" / "emu" / "x.JPEG").write_bytes((messy / "folder" / "val" / "cat").iterdir()
                                                                   .__next__().read_bytes())
    else:
        with tarfile.open(messy / "shards" / "train-000009.tar", "w") as tar:
            tar.add(next((messy / "folder" / "train" / "cat").iterdir()), arcname="lonely.jpg")
    hp = _hp(epochs=1, ema_decay=0.0, warmup_epochs=0)
    workers = 1 if case == "corrupt_in_a_worker" else 0
    cfg = write_config(tmp_path / "exp.yaml", hp, _data(messy, layout, subset=None if case.startswith("corrupt") else 40,
                                                        num_workers=workers))
    if workers:     # raised in the worker, re-raised by the DataLoader with its traceback: still one line
        proc = run_model_def(str(cfg), "--max-batches", "100", "--output", str(tmp_path / "o"))
    else:
        proc = run_in_process(str(cfg), "--max-batches", "100", "--output", str(tmp_path / "o"), cwd=tmp_path)
    _one_line(proc, message)


@pytest.mark.slow
def test_bad_images_can_be_skipped_and_counted(tmp_path, messy):
    bad = sorted((messy / "folder" / "train" / "bird").iterdir())[:2]
    for f in bad:
        f.write_bytes(b"not an image")
    cfg = write_config(tmp_path / "exp.yaml", _hp(epochs=1, ema_decay=0.0, warmup_epochs=0),
                       _data(messy, "folder", skip_bad_images=True))
    proc = run_in_process(str(cfg), "--output", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped_images 2" in proc.stdout
    assert all(str(f) in proc.stderr for f in bad)
    import contextlib
    import io

    from nas_trial.export import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):       # this run kept no weight EMA
        assert main([str(tmp_path / "o"), "--format", "onnx", "--output", str(tmp_path / "x"), "--weights",
                     "ema"]) == 2
    assert err.getvalue().startswith("error: --weights ema:") and len(err.getvalue().splitlines()) == 1


def test_loader_memory_does_not_grow_with_the_image_count(tmp_path, imagenet):
    """Peak RSS of a child process that iterates the loader over 200 vs 2000 image entries
    (the same files listed ten times) within 5%."""
    root, _ = imagenet
    script = tmp_path / "rss.py"
    script.write_text(f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
import numpy as np, torch
from nas_data.streaming import StreamingImages, index_folder, train_transform
torch.set_num_threads(1)
index = index_folder({str(root / 'folder')!r}, 'train')
n = int(sys.argv[1])
index = index.subset(np.arange(n) % len(index))
data = StreamingImages(index, train_transform(96, 0.4, 0.2), True, 0)
loader = torch.utils.data.DataLoader(data, batch_size=20, num_workers=0)
for x, y in loader:
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")
    rss = {}
    for n in (200, 2000):
        proc = subprocess.run([sys.executable, str(script), str(n)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rss[n] = int(proc.stdout.strip().splitlines()[-1])
    assert rss[2000] <= rss[200] * 1.05, rss


@pytest.mark.slow
def test_ema_weights_export_and_verify(tmp_path, imagenet):
    """The EMA weights of a streamed ImageNet retraining export to ONNX and reproduce the
    PyTorch network on held-out images; a run without EMA refuses --weights ema in one line."""
    from nas_trial.export import main

    root, _ = imagenet
    cfg = write_config(tmp_path / "exp.yaml", _hp(epochs=1, warmup_epochs=0), _data(root, "folder"))
    assert run_in_process(str(cfg), "--output", str(tmp_path / "o"), cwd=tmp_path).returncode == 0
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(tmp_path / "o"), "--format", "onnx", "--output", str(tmp_path / "x"), "--weights", "ema",
                     "--images", "16"]) == 0
    meta = json.loads((tmp_path / "x" / "model.json").read_text())
    assert meta["provenance"]["weights"] == "ema" and meta["verification"]["max_abs_diff"] <= 1e-4
    assert meta["input"]["shape"][1:] == [3, 96, 96] and len(meta["classes"]) == len(CLASSES)


def test_flat_val_folder_with_a_labels_file(tmp_path, imagenet):
    """ImageNet's official val/ layout: images in one folder, classes from a file of
    '<image> <class>' lines (Kaggle's CSV form, 'name,class extra', read the same)."""
    import shutil

    root, _ = imagenet
    data = tmp_path / "inet"
    shutil.copytree(root / "folder" / "train", data / "train")
    (data / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for cls_dir in sorted((root / "folder" / "val").iterdir()):
        for f in sorted(cls_dir.iterdir()):
            shutil.copy(f, data / "val" / f.name)
            lines.append(f"{f.stem},{cls_dir.name} 1 2 3 4")
    (data / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    train = index_folder(data, "train")
    val = index_folder(data, "val", classes=train.classes, labels_file="LOC_val_solution.csv")
    nested = index_folder(root / "folder", "val", classes=train.classes)
    assert len(val) == len(nested) == 8 * len(CLASSES)
    assert sorted((val.name(i).split("/")[-1], int(val.labels[i])) for i in range(len(val))) == \
        sorted((nested.name(i).split("/")[-1], int(nested.labels[i])) for i in range(len(nested)))
    (data / "val" / "stray.JPEG").write_bytes(b"x")
    with pytest.raises(DataError, match="stray.JPEG has no line in data.val_labels"):
        index_folder(data, "val", classes=train.classes, labels_file="LOC_val_solution.csv")
