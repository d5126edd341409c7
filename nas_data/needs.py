"""What a trial needs from its container image, checked (and installed if missing) by
``startup-hook.sh`` before Determined starts the trial.

Run by path, standard library only (the packages it checks may be the missing ones):

    "$DET_PYTHON_EXECUTABLE" nas_data/needs.py

It reads the experiment's ``data:`` section from ``DET_EXPERIMENT_CONFIG`` (set by the
master in every trial container), installs nothing when the image has what that dataset
needs, installs only what is missing with ``pip install --user`` (Determined's own setup
does the same, so it works as non-root), and otherwise fails with one line on stderr.
torch, torchvision and determined are never installed: they come with the image.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

# import name -> pip name, needed by every trial
ALWAYS = {"numpy": "numpy", "PIL": "pillow", "tensorboard": "tensorboard"}
# and by each dataset (nas_data.sources registers these names; a test keeps the two equal)
BY_DATASET: dict[str, dict[str, str]] = {
    "cifar10": {},
    "cifar100": {},
    "image_folder": {},
    "imagenet16-120": {},
    "digits": {"sklearn": "scikit-learn"},
    "imagenet_folder": {},
    "imagenet_shards": {},
}
# and by a NAS-Bench-201 search's benchmark file (hyperparameters.benchmark.file), by its kind
# (search_spaces/nb201_benchmark.py tells them apart the same way; a CSV needs nothing)
BY_BENCHMARK: dict[str, dict[str, str]] = {
    "nats": {"nats_bench": "nats_bench"},
    "nas-bench-201": {"nas_201_api": "nas-bench-201"},
    "csv": {},
}
# never installed here: what the image itself must bring
FROM_IMAGE = ("torch", "torchvision", "determined")
TESTED_TORCH = "2.14.1"        # the pin in requirements.txt and the README's images

PREFIX = "startup-hook:"


class NeedsError(Exception):
    """What is wrong, in one line, and how to fix it."""


def datasets_of(experiment_config: dict) -> list[str]:
    """The datasets a trial of this experiment may load: ``data.dataset`` and its fallback."""
    data = experiment_config.get("data") or {}
    names = [data.get("dataset", "cifar10")]
    if data.get("fallback"):
        names.append(data["fallback"])
    return names


def benchmark_kind(experiment_config: dict) -> str | None:
    """The kind of benchmark file a search names in ``hyperparameters.benchmark.file`` (a plain
    value or a const hyperparameter), or None."""
    bench = (experiment_config.get("hyperparameters") or {}).get("benchmark")
    if isinstance(bench, dict) and bench.get("type") == "const":
        bench = bench.get("val")
    if not isinstance(bench, dict):
        return None
    file = bench.get("file")
    if isinstance(file, dict):
        file = file.get("val")
    if not isinstance(file, str):
        return None
    name = file.lower().rstrip("/")
    return "nas-bench-201" if name.endswith(".pth") else "csv" if name.endswith(".csv") else "nats"


def needed(datasets: list[str], benchmark: str | None = None) -> dict[str, str]:
    """import name -> pip name for everything a trial on these datasets (and benchmark file) imports."""
    out = dict(ALWAYS)
    out.update(BY_BENCHMARK.get(benchmark or "csv", {}))
    for name in datasets:
        if name not in BY_DATASET:
            raise NeedsError(f"data.dataset {name!r} is not one of {', '.join(BY_DATASET)}; fix the "
                             f"experiment's data: section")
        out.update(BY_DATASET[name])
    return out


def missing(modules: dict[str, str]) -> list[str]:
    """pip names of the modules this interpreter cannot import."""
    return [pip for mod, pip in modules.items() if importlib.util.find_spec(mod) is None]


def importable_in_new_process(modules: list[str]) -> bool:
    code = "; ".join(f"import {m}" for m in modules)
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def pip_install_user(packages: list[str], why: str) -> None:
    """``python -m pip install --user``; pip's own output goes to a log file, not the trial log."""
    log = os.path.join(tempfile.gettempdir(), "nas-startup-pip.log")
    cmd = [sys.executable, "-m", "pip", "install", "--user", "--no-input", "--disable-pip-version-check",
           "--retries", "2", "--timeout", "20", *packages]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        with open(log) as f:
            last = [line.strip() for line in f if line.strip()]
        tail = f" (pip: {last[-1][:160]})" if last else ""
        raise NeedsError(f"could not install {' '.join(packages)}, which {why} needs, with "
                         f"`pip install --user`{tail}; full log {log}. Use an image that has them "
                         f"(README, 'Cluster images') or give the nodes a package index")


def check_image() -> str:
    """torch and determined come from the image: a one-line summary, or NeedsError."""
    absent = [m for m in FROM_IMAGE if importlib.util.find_spec(m) is None]
    if absent:
        raise NeedsError(f"the image lacks {', '.join(absent)}; set environment.image to one of the "
                         f"README's images ('Cluster images')")
    import determined
    import torch
    line = (f"torch {torch.__version__} (cuda {torch.version.cuda}, available: {torch.cuda.is_available()}), "
            f"determined {determined.__version__}")
    if torch.__version__.split("+")[0] != TESTED_TORCH:
        line += f"; note: this project is tested with torch {TESTED_TORCH}"
    return line


def main() -> int:
    try:
        raw = os.environ.get("DET_EXPERIMENT_CONFIG")
        try:
            config = json.loads(raw) if raw else {}
        except json.JSONDecodeError as e:
            raise NeedsError(f"DET_EXPERIMENT_CONFIG is not JSON ({e}); is this a Determined trial container?")
        datasets = datasets_of(config)
        benchmark = benchmark_kind(config)
        why = f"data.dataset {' / '.join(datasets)}" + (f" and a {benchmark} benchmark file" if benchmark else "")
        modules = needed(datasets, benchmark)
        lacking = missing(modules)
        if lacking:
            print(f"{PREFIX} installing {' '.join(lacking)} (pip --user): the image lacks them and {why} "
                  f"needs them", flush=True)
            pip_install_user(lacking, why)
            importlib.invalidate_caches()
            still = [mod for mod, pip in modules.items() if pip in lacking]
            if not importable_in_new_process(still):
                raise NeedsError(f"installed {' '.join(lacking)} with `pip install --user`, but python still "
                                 f"cannot import them (user site-packages off, e.g. in a virtualenv?); use "
                                 f"an image that has them (README, 'Cluster images')")
        else:
            print(f"{PREFIX} the image has what {why} needs; installing nothing", flush=True)
        print(f"{PREFIX} {check_image()}", flush=True)
        return 0
    except NeedsError as e:
        print(f"{PREFIX} error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
