"""Ship a retrained network: export it to ONNX or TorchScript, verify the file against PyTorch
on real held-out images, and write beside it what a serving team needs.

    python -m nas_trial export SOURCE --format onnx|torchscript --output DIR
        [--overwrite] [--normalize-inside] [--benchmark] [--images N] [--data-root PATH]

SOURCE is a retraining's checkpoint directory (local, or one ``det checkpoint download``
fetched) or a local run's ``--output`` directory (its newest complete checkpoint, said which).
The network is built from the checkpoint's own hyperparameters, in eval mode, without the
auxiliary head and drop path, returning logits, with a dynamic batch dimension. Its input is
float32 NCHW, normalized with the dataset's mean/std; with ``--normalize-inside`` the file
takes images in [0, 1] and normalizes them itself.

Nothing is written unless the exported file passes verification: its outputs on ``--images``
(default 256) held-out test images of the run's dataset, in batches of 64 and one of 1, against
PyTorch's (maximum absolute difference at most 1e-4, the same top-1 class for every image),
``onnx.checker`` and an ONNX Runtime session for ONNX. The directory then holds the file,
``model.json`` (genotype, classes in label order, input, normalization, parameters and
multiply-adds, provenance, versions, the verification figures and, with ``--benchmark``,
latency at batch 1 and throughput at batch 64 on this machine's CPU and, where present, CUDA)
and ``genotype.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

import search_spaces
from nas_settings import ArgumentParser
from search_spaces import cpu_kernels

from .config import RetrainConfig
from .state import CheckpointError, find_checkpoint, load_checkpoint_state, write_json

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
MAX_ABS_DIFF = 1e-4          # fp32, exported file against PyTorch
VERIFY_BATCH = 64
ONNX_OPSET = 20              # the dynamo exporter's own default in torch 2.14
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ExportError(ValueError):
    """A source, option or output that cannot be exported; one line saying what to do."""


@dataclass(frozen=True)
class Retrained:
    """What a retraining checkpoint holds, read and checked."""
    checkpoint: Path
    note: Optional[str]                 # which checkpoint of a run directory was taken
    hparams: dict[str, Any]
    data: dict[str, Any]                # the experiment's data section
    cfg: RetrainConfig
    genotype: Any
    weights: dict[str, torch.Tensor]    # the network's state dict, without the auxiliary head
    steps: int
    validation: dict[str, Any]          # the last validation's metrics (val_accuracy, test_accuracy, ...)
    run: str


class Deployable(nn.Module):
    """The retrained network as served: logits only; with ``mean``/``std``, images in [0, 1]
    are normalized inside."""

    def __init__(self, net: nn.Module, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        self.net = net
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, C, H, W) -> (B, classes)
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.net(x)[0]


# -- reading the source ------------------------------------------------------------------------
def read_retrained(source: str, weights: str = "raw") -> Retrained:
    """``weights``: ``raw`` (the trained weights) or ``ema`` (their moving average, when the
    run kept one: ``ema_decay``)."""
    try:
        checkpoint, progress, note = find_checkpoint(source, what="SOURCE")
        state = load_checkpoint_state(checkpoint, what="SOURCE")
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    try:
        load_data = json.loads((checkpoint / "load_data.json").read_text())
        hparams = dict(load_data["hparams"])
        experiment = load_data.get("experiment_config") or {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"SOURCE {checkpoint}: load_data.json is missing or unreadable ({type(e).__name__}); "
                          "export a checkpoint this project's trials wrote") from None
    if "genotype" not in hparams:
        raise ExportError(f"SOURCE {checkpoint} is a search checkpoint: it holds a supernet, not a retrained "
                          f"network; retrain its cell first (python model_def.py experiments/retrain-darts-cifar10.yaml "
                          f"--set genotype={checkpoint / 'genotype.json'}) and export that run")
    try:
        raw = RetrainConfig.from_hparams(hparams)
        spec = raw.genotype
        if spec.endswith(".json") and not Path(spec).is_absolute():
            # a genotype.json named relative to the experiment's directory: the checkpoint's
            # copy of the code holds it, else this project
            spec = str(next((d / spec for d in (checkpoint / "code", PROJECT_ROOT) if (d / spec).is_file()), spec))
        genotype = search_spaces.parse_genotype(spec, space=raw.space)
        cfg = raw.resolve(genotype.space)
    except (ValueError, search_spaces.GenotypeError) as e:
        raise ExportError(f"SOURCE {checkpoint}: its hyperparameters do not describe a retraining ({e})") from None
    models = state.get("models_state_dict") if isinstance(state, dict) else None
    if not isinstance(models, list) or len(models) != 1:
        raise ExportError(f"SOURCE {checkpoint}: state_dict.pth holds no single network; export a retraining "
                          "checkpoint")
    if weights == "ema":
        ema = (((state.get("callbacks") or {}).get("nas_state") or {}).get("extra") or {}).get("ema")
        if not isinstance(ema, dict):
            raise ExportError(f"--weights ema: SOURCE {checkpoint} holds no weight EMA (its run had no ema_decay); "
                              "export --weights raw")
        chosen = {k: v for k, v in ema.items() if k != "n_averaged"}
    else:
        chosen = models[0]
    weights = {k.removeprefix("module."): v for k, v in chosen.items()
               if not k.removeprefix("module.").startswith("auxiliary_head.")}
    history = ((state.get("callbacks") or {}).get("observe") or {}).get("history") or {}
    validations = [v for v in history.get("validation", []) if v.get("step", -1) <= progress["batches_trained"]]
    # the run that wrote it (progress.json; older checkpoints: where it lies)
    run = progress.get("run") or (str(checkpoint.parent.parent) if checkpoint.parent.name == "determined"
                                  else str(checkpoint))
    return Retrained(checkpoint=checkpoint, note=note, hparams=hparams, data=dict(experiment.get("data") or {}),
                     cfg=cfg, genotype=genotype, weights=weights, steps=int(progress["batches_trained"]),
                     validation=validations[-1] if validations else {}, run=run)


def build_network(r: Retrained, num_classes: int) -> nn.Module:
    net = search_spaces.create_network(r.genotype, C=r.cfg.init_channels, layers=r.cfg.layers,
                                       num_classes=num_classes, auxiliary=False, variant=r.cfg.variant)
    try:
        net.load_state_dict(r.weights, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ExportError(f"SOURCE {r.checkpoint}: its weights do not fit the network its hyperparameters "
                          f"describe ({first}); was state_dict.pth replaced?") from None
    if hasattr(net, "drop_path_prob"):
        net.drop_path_prob = 0.0
    return net.eval()


def held_out_images(r: Retrained, data_root: Optional[str], count: int):
    """``count`` held-out test images (float, normalized as in training), their labels, the
    class names, the image shape and the normalization."""
    from nas_data import DataConfig, DataError, build_retrain_data

    data = dict(r.data)
    if data_root:
        data["root"] = str(Path(data_root).expanduser().resolve())
    elif data.get("root") and not Path(data["root"]).is_absolute():
        data["root"] = str(PROJECT_ROOT / data["root"])          # as the run read it
    data["test_subset"] = None
    try:
        cfg = DataConfig.from_mapping(data)
        built = build_retrain_data(cfg, r.cfg.seed, cutout=0)
    except (DataError, ValueError) as e:
        raise ExportError(f"the run's data ({data.get('dataset')}, root {data.get('root')}) for verification: {e}; "
                          "point --data-root at the dataset") from None
    test = built.test
    n = min(count, len(test))
    idx = np.random.default_rng(0).permutation(len(test))[:n]
    x = torch.stack([test[int(i)][0] for i in idx])
    y = torch.tensor([test[int(i)][1] for i in idx])
    return x, y, built


# -- exporting ---------------------------------------------------------------------------------
def export_file(model: nn.Module, example: torch.Tensor, fmt: str, path: Path) -> dict[str, Any]:
    """Write ``model`` to ``path``; the device-agnostic forward (no CPU-only kernels), batch dynamic."""
    with torch.no_grad(), cpu_kernels.disabled(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            import contextlib
            import io

            batch = torch.export.Dim("batch", min=1, max=65536)
            with contextlib.redirect_stdout(io.StringIO()):    # the exporter's progress lines
                torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                                  dynamo=True, dynamic_shapes={"x": {0: batch}}, opset_version=ONNX_OPSET,
                                  external_data=False)
            return {"opset": ONNX_OPSET, "exporter": "torch.onnx.export(dynamo=True)"}
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))
        return {"exporter": "torch.jit.trace"}


def runner_for(fmt: str, path: Path, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A function running the exported file on a float32 batch, as a serving stack would."""
    if fmt == "onnx":
        import onnxruntime as ort

        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        session = ort.InferenceSession(str(path), providers=[provider])
        return lambda x: session.run(["logits"], {"images": x})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)      # torch.jit is deprecated in favour of torch.export
        module = torch.jit.load(str(path), map_location=device).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x).to(device)).cpu().numpy()
    return run


def verify(fmt: str, path: Path, model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """The exported file against PyTorch on ``images``, in batches of 64 and one batch of 1."""
    if fmt == "onnx":
        import onnx

        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as e:
            raise ExportError(f"the exported ONNX file fails onnx.checker ({str(e).splitlines()[0]}); nothing "
                              "was written") from None
    run = runner_for(fmt, path)
    with torch.no_grad():
        expected = torch.cat([model(images[i:i + VERIFY_BATCH]) for i in range(0, len(images), VERIFY_BATCH)])
    got = torch.from_numpy(np.concatenate([run(images[i:i + VERIFY_BATCH].numpy())
                                           for i in range(0, len(images), VERIFY_BATCH)]))
    single = torch.from_numpy(run(images[:1].numpy()))
    diff = max(float((got - expected).abs().max()), float((single - expected[:1]).abs().max()))
    same_top1 = int((got.argmax(1) == expected.argmax(1)).sum())
    result = {"images": len(images), "batches": f"{VERIFY_BATCH} and 1", "max_abs_diff": diff,
              "max_abs_diff_allowed": MAX_ABS_DIFF, "top1_agree": same_top1, "checker": fmt == "onnx" or None}
    if diff > MAX_ABS_DIFF or same_top1 != len(images):
        raise ExportError(f"the exported {fmt} file does not reproduce PyTorch: max |difference| {diff:.3g} "
                          f"(allowed {MAX_ABS_DIFF}), top-1 equal on {same_top1} of {len(images)} images; nothing "
                          "was written")
    return {k: v for k, v in result.items() if v is not None}


def _timed(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def benchmark(fmt: str, path: Path, shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Latency at batch 1 and throughput at batch 64, median of repeats after warm-up, on the
    CPU and, where torch sees one, on CUDA (ONNX there only with onnxruntime's CUDA build)."""
    out = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        if fmt == "onnx" and device == "cuda":
            import onnxruntime as ort
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                out.append({"device": "cuda", "skipped": "onnxruntime has no CUDA provider here (pip install "
                                                         "onnxruntime-gpu)"})
                continue
        run = runner_for(fmt, path, device)     # outputs come back to the host: the GPU work is done
        one = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
        many = np.random.default_rng(1).standard_normal((64, *shape)).astype(np.float32)
        latency = _timed(run, one, warmup=10, repeats=50)
        per_batch = _timed(run, many, warmup=3, repeats=10)
        out.append({"device": device, "runtime": "onnxruntime" if fmt == "onnx" else "torch.jit",
                    "threads": torch.get_num_threads(), "latency_ms_batch1": round(latency * 1e3, 3),
                    "images_per_s_batch64": round(64 / per_batch, 1),
                    "repeats": {"batch1": 50, "batch64": 10}, "warmup": {"batch1": 10, "batch64": 3}})
    return out


def _versions(fmt: str) -> dict[str, Any]:
    v = {"torch": torch.__version__, "python": platform.python_version()}
    if fmt == "onnx":
        import onnx
        import onnxruntime
        v.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, opset=ONNX_OPSET)
    return v


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(source: str, fmt: str, output: str, overwrite: bool = False, normalize_inside: bool = False,
           run_benchmark: bool = False, images: int = 256, data_root: Optional[str] = None,
           weights: str = "raw") -> dict[str, Any]:
    """Export, verify and write; returns the metadata written to ``model.json``."""
    if weights not in ("raw", "ema"):
        raise ExportError(f"--weights must be raw or ema, got {weights!r}")
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if images < 1:
        raise ExportError(f"--images must be >= 1, got {images}")
    out = Path(output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--output {output} is a file; give a directory to create")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--output {output} exists and is not empty; give a new directory or add --overwrite")
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--output {output}: {parent} is not a writable directory")
    r = read_retrained(source, weights)
    x, y, data = held_out_images(r, data_root, images)
    c, h, w = data.image_shape
    net = build_network(r, data.num_classes)
    mean, std = data.mean, data.std
    model = Deployable(net, mean, std) if normalize_inside else Deployable(net)
    inputs = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1) if normalize_inside \
        else x
    with tempfile.TemporaryDirectory(prefix=".export-", dir=parent) as tmp:
        staging = Path(tmp) / "out"
        staging.mkdir()
        file = staging / FORMATS[fmt]
        exporter = export_file(model, inputs[:2], fmt, file)
        checks = verify(fmt, file, model, inputs)
        with torch.no_grad():
            accuracy = float((model(inputs).argmax(1) == y).float().mean())
        meta = {
            "format": fmt, "file": FORMATS[fmt], "sha256": _sha256(file), "bytes": file.stat().st_size,
            "genotype": r.genotype.to_str(), "space": r.genotype.space, "classes": list(data.classes),
            "input": {"name": "images" if fmt == "onnx" else "x", "shape": ["batch", c, h, w], "dtype": "float32",
                      "layout": "NCHW", "range": "[0, 1], RGB" if normalize_inside else
                      "normalized: (pixel / 255 - mean) / std per channel, RGB"},
            "output": {"name": "logits", "shape": ["batch", data.num_classes], "meaning": "logits in class order"},
            "normalization": {"mean": list(mean), "std": list(std), "inside_the_file": normalize_inside},
            "network": {"variant": r.cfg.variant, "init_channels": r.cfg.init_channels, "layers": r.cfg.layers,
                        "params": search_spaces.count_parameters(net),
                        "macs": search_spaces.count_macs(net, (1, c, h, w))},
            "provenance": {"checkpoint": str(r.checkpoint), "run": r.run, "step": r.steps, "weights": weights,
                           "dataset": r.data.get("dataset"), "hyperparameters": r.hparams,
                           "validation": {k: r.validation[k] for k in ("step", "val_accuracy", "test_accuracy",
                                                                       "val_loss", "test_loss")
                                          if k in r.validation},
                           **{k: v for k, v in r.cfg.candidate_metrics(r.genotype).items()}},
            "export": {**exporter, "dynamic_batch": True},
            "verification": {**checks, "top1_accuracy_on_these_images": accuracy},
            "versions": _versions(fmt), "machine": {"cpu": platform.processor() or platform.machine()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if run_benchmark:
            meta["benchmark"] = benchmark(fmt, file, (c, h, w))
        write_json(staging / "model.json", meta)
        write_json(staging / "genotype.json", r.genotype.to_json())
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    return {**meta, "note": r.note, "output": str(out)}


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m nas_trial export",
                       description="Export a retrained network to ONNX or TorchScript, verified on held-out images.")
    p.add_argument("source", metavar="SOURCE", help="a retraining checkpoint directory or a local run's --output")
    p.add_argument("--format", required=True, help="onnx or torchscript")
    p.add_argument("--output", required=True, help="directory to create (model file, model.json, genotype.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--normalize-inside", action="store_true",
                   help="the file takes images in [0, 1] and normalizes them itself")
    p.add_argument("--benchmark", action="store_true", help="time batch 1 and batch 64 on this machine")
    p.add_argument("--images", type=int, default=256, help="held-out images to verify on (default 256)")
    p.add_argument("--weights", default="raw", help="raw (default) or ema: the weights' moving average, when the "
                                                   "run kept one (ema_decay)")
    p.add_argument("--data-root", default=None, help="where the run's dataset is here, if not where the run read it")
    args = p.parse_args(argv)
    try:
        meta = export(args.source, args.format, args.output, overwrite=args.overwrite,
                      normalize_inside=args.normalize_inside, run_benchmark=args.benchmark, images=args.images,
                      data_root=args.data_root, weights=args.weights)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if meta["note"]:
        print(f"export: {meta['note']}")
    v = meta["verification"]
    print(f"export: {meta['output']}/{meta['file']} ({meta['format']}, {meta['bytes']:,} bytes): "
          f"{meta['network']['params']:,} parameters, {meta['network']['macs']:,} multiply-adds at "
          f"{meta['input']['shape'][1:]}; verified on {v['images']} held-out images: max |difference| "
          f"{v['max_abs_diff']:.2g}, top-1 equal on {v['top1_agree']}")
    for b in meta.get("benchmark", []):
        if "skipped" in b:
            print(f"export: benchmark {b['device']}: skipped ({b['skipped']})")
        else:
            print(f"export: benchmark {b['device']} ({b['runtime']}): {b['latency_ms_batch1']} ms at batch 1, "
                  f"{b['images_per_s_batch64']} images/s at batch 64")
    print(f"export: metadata {meta['output']}/model.json")
    return 0
