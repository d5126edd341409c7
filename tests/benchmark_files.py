"""Small NAS-Bench-201 benchmark files in the real formats, written with the benchmarks' own
classes (``ArchResults``, ``ResultsCount``): a NATS-Bench topology fast-mode directory
(``meta.pickle.pbz2`` and one ``<index>.pickle.pbz2`` per cell, ``{"12": ..., "200": ...}``)
and its ``.tar``, a NAS-Bench-201 ``.pth`` (``meta_archs``, ``arch2infos`` with ``less``/``full``,
``evaluated_indexes``), and a CSV. Each cell's accuracies after the last epoch are known
(two seeds, 0.5 above and below); every other epoch holds 10%."""
from __future__ import annotations

import csv
import tarfile
import zlib
from pathlib import Path

ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
ALL_3X3 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
# (valid, test) on CIFAR-10 after 200 epochs: the collapse cell and the all-3x3 cell
KNOWN = {ALL_SKIP: (52.1, 54.30), ALL_3X3: (91.5, 94.37)}
DATASET_SETS = {"cifar10-valid": ("x-valid", "ori-test"), "cifar10": ("ori-test",),
                "cifar100": ("x-valid", "x-test", "ori-test"), "ImageNet16-120": ("x-valid", "x-test", "ori-test")}


def accuracies(arch: str, dataset: str, epochs: int) -> tuple[float, float]:
    """The (valid, test) accuracy this file gives ``arch``; CIFAR-10 test is after training on
    train+valid, valid that of ``cifar10-valid``."""
    if arch in KNOWN and dataset == "cifar10" and epochs == 200:
        return KNOWN[arch]
    base = 60.0 + zlib.crc32(f"{arch}{dataset}".encode()) % 300 / 10
    base -= 0 if epochs == 200 else 15.0
    return round(base - 2.0, 2), round(base, 2)


def _set_value(arch: str, dataset: str, setname: str, epochs: int) -> float:
    ds = "cifar10" if dataset.startswith("cifar10") and not dataset.startswith("cifar100") else dataset
    valid, test = accuracies(arch, ds, epochs)
    return {"x-valid": valid, "x-test": test, "ori-test": test if ds == "cifar10" else (valid + test) / 2}[setname]


def arch_results(module, index: int, arch: str, epochs: int):
    results = module.ArchResults(index, arch)
    for dataset, sets in DATASET_SETS.items():
        for seed, offset in ((777, 0.5), (888, -0.5)):
            r = module.ResultsCount(dataset, None, {e: 50.0 for e in range(epochs)}, {e: 1.5 for e in range(epochs)},
                                    0.8, 120.0, {"arch_str": arch, "name": "infer.tiny", "C": 16, "N": 5}, seed,
                                    epochs, [0.01])
            accs, losses, times = {}, {}, {}
            for name in sets:
                for e in range(epochs):
                    key = f"{name}@{e}"
                    accs[key] = _set_value(arch, dataset, name, epochs) + offset if e == epochs - 1 else 10.0
                    losses[key], times[key] = 1.0, 0.1
            r.update_eval(accs, losses, times)
            results.update(dataset, seed, r)
    return results


def write_nats(directory: Path, archs: list[str]) -> Path:
    import nats_bench

    directory.mkdir(parents=True)
    nats_bench.pickle_save({"meta_archs": list(archs)}, str(directory / "meta.pickle"))
    for index, arch in enumerate(archs):
        nats_bench.pickle_save({hp: arch_results(nats_bench, index, arch, int(hp)).state_dict() for hp in ("12", "200")},
                               str(directory / f"{index:06d}.pickle"))
    return directory


def write_nats_tar(path: Path, archs: list[str]) -> Path:
    directory = write_nats(path.parent / "NATS-tss-v1_0-3ffb9-simple", archs)
    with tarfile.open(path, "w") as tar:
        tar.add(directory, arcname=directory.name)
    return path


def write_pth(path: Path, archs: list[str]) -> Path:
    import nas_201_api
    import torch

    torch.save({"meta_archs": list(archs),
                "arch2infos": {i: {"less": arch_results(nas_201_api, i, a, 12).state_dict(),
                                   "full": arch_results(nas_201_api, i, a, 200).state_dict()}
                               for i, a in enumerate(archs)},
                "evaluated_indexes": set(range(len(archs)))}, path)
    return path


def write_csv(path: Path, archs: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch", "dataset", "epochs", "valid_accuracy", "test_accuracy"])
        for arch in archs:
            for dataset in ("cifar10", "cifar100", "ImageNet16-120"):
                for epochs in (12, 200):
                    valid, test = accuracies(arch, dataset, epochs)
                    w.writerow([arch, dataset, epochs, valid, test])
    return path


WRITERS = {"nats": lambda tmp, archs: write_nats(tmp / "NATS-tss-v1_0-3ffb9-simple", archs),
           "nats-tar": lambda tmp, archs: write_nats_tar(tmp / "tar" / "NATS-tss-v1_0-3ffb9-simple.tar", archs),
           "pth": lambda tmp, archs: write_pth(tmp / "NAS-Bench-201-v1_1-096897.pth", archs),
           "csv": lambda tmp, archs: write_csv(tmp / "nb201.csv", archs)}
