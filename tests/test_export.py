"""Export of retrained networks (python -m nas_trial export): DARTS-space (cifar and imagenet
variants) and NAS-Bench-201 networks, each retrained for a few batches on the real CIFAR-10
JPEGs from ../shared, exported in both formats and verified against PyTorch on 256 held-out
images; the one-line errors."""
import json
import shutil

import numpy as np
import pytest
import torch

from nas_trial import export
from tests.conftest import require_cifar
from tests.helpers import checkpoints, run_in_process, write_config

NETWORKS = {
    # the auxiliary head is trained and must not be exported
    "darts-cifar": {"genotype": "DARTS_V2", "init_channels": 4, "layers": 5, "auxiliary": True,
                    "auxiliary_weight": 0.4, "drop_path_prob": 0.2},
    "darts-imagenet": {"genotype": "GAEA_PC_DARTS_IMAGENET", "variant": "imagenet",
                       "init_channels": 8, "layers": 5, "auxiliary": False},
    "nb201": {"genotype": "|nor_conv_3x3~0|+|skip_connect~0|avg_pool_3x3~1|+|nor_conv_1x1~0|none~1|nor_conv_3x3~2|",
              "init_channels": 4, "layers": 1},
}


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """Each network retrained for 3 batches of 16 on CIFAR-10 JPEGs (run directories)."""
    root = require_cifar()
    tmp = tmp_path_factory.mktemp("retrained")
    runs = {}
    for name, hp in NETWORKS.items():
        cfg = write_config(tmp / f"{name}.yaml", {"global_batch_size": 16, "epochs": 1, **hp},
                           {"dataset": "image_folder", "root": str(root), "subset": 300, "test_subset": 400})
        proc = run_in_process(str(cfg), "--max-batches", "3", "--output", str(tmp / name), cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = tmp / name
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_exported_network_reproduces_pytorch_on_held_out_images(retrained, tmp_path, name, fmt, capsys):
    out = tmp_path / "exported"
    assert export.main([str(retrained[name]), "--format", fmt, "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "newest complete checkpoint of" in said and "verified on 256 held-out images" in said
    meta = json.loads((out / "model.json").read_text())
    v = meta["verification"]
    assert v["images"] == 256 and v["max_abs_diff"] <= 1e-4 and v["top1_agree"] == 256
    assert meta["classes"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck"]
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and not meta["normalization"]["inside_the_file"]
    assert meta["provenance"]["step"] == 3 and meta["provenance"]["validation"]["step"] == 3
    assert meta["provenance"]["run"] == str(retrained[name])
    assert 0 <= meta["provenance"]["validation"]["test_accuracy"] <= 1
    assert meta["network"]["params"] > 0 and meta["network"]["macs"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["genotype.json", "model.json", meta["file"]])
    # a serving stack's view: any batch size; no auxiliary head in the file
    run = export.runner_for(fmt, out / meta["file"])
    logits = run(np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32))
    assert logits.shape == (5, 10) and np.isfinite(logits).all()
    if fmt == "onnx":
        import onnx
        model = onnx.load(str(out / meta["file"]))
        assert meta["versions"]["opset"] == 20 and any(o.version == 20 for o in model.opset_import)
        assert not [n for n in model.graph.initializer if "auxiliary" in n.name]
    else:
        assert not [k for k in torch.jit.load(str(out / meta["file"])).state_dict() if "auxiliary" in k]


@pytest.mark.slow
def test_normalization_inside_and_the_benchmark(retrained, tmp_path, capsys):
    out = tmp_path / "exported"
    assert export.main([str(retrained["nb201"]), "--format", "onnx", "--output", str(out), "--normalize-inside",
                        "--benchmark"]) == 0
    said = capsys.readouterr().out
    meta = json.loads((out / "model.json").read_text())
    assert meta["normalization"]["inside_the_file"] and meta["input"]["range"] == "[0, 1], RGB"
    assert meta["verification"]["top1_agree"] == 256
    cpu = next(b for b in meta["benchmark"] if b["device"] == "cpu")
    assert cpu["latency_ms_batch1"] > 0 and cpu["images_per_s_batch64"] > 0
    assert "ms at batch 1" in said
    # the same images, as pixels in [0, 1], give the file the logits PyTorch gives the normalized ones
    mean, std = (np.array(meta["normalization"][k], dtype=np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    x = np.random.default_rng(1).uniform(0, 1, (4, 3, 32, 32)).astype(np.float32)
    r = export.read_retrained(str(retrained["nb201"]))
    net = export.build_network(r, 10)
    with torch.no_grad():
        expected = net(torch.from_numpy((x - mean) / std))[0].numpy()
    assert np.abs(export.runner_for("onnx", out / "model.onnx")(x) - expected).max() <= 1e-4


@pytest.fixture(scope="module")
def bad_sources(retrained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    ck = checkpoints(retrained["nb201"])[3]
    half = tmp / "half" / "determined" / ck.name
    shutil.copytree(ck, half)
    (half / "progress.json").unlink()
    corrupt = tmp / "corrupt"
    shutil.copytree(ck, corrupt)
    (corrupt / "state_dict.pth").write_bytes((ck / "state_dict.pth").read_bytes()[:500])
    search = tmp / "search"
    cfg = write_config(tmp / "search.yaml", {"global_batch_size": 16, "space": "nas-bench-201",
                                             "space_args": {"C": 4, "layers": 1}, "optimizer": "gaea", "epochs": 1},
                       {"dataset": "digits", "subset": 200})
    proc = run_in_process(str(cfg), "--max-batches", "2", "--output", str(search), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tmp / "taken").mkdir()
    (tmp / "taken" / "x").write_text("x")
    return {"half": half, "corrupt": corrupt, "search": search, "taken": tmp / "taken", "run": retrained["nb201"],
            "tmp": tmp}


@pytest.mark.slow
@pytest.mark.parametrize("source,extra,expected", [
    ("search", [], "is a search checkpoint: it holds a supernet, not a retrained network; retrain its cell first"),
    ("half", [], "an incomplete checkpoint (its writing was interrupted)"),
    ("corrupt", [], "state_dict.pth cannot be read"),
    ("run", ["--format", "tflite"], "--format 'tflite' is not one of onnx, torchscript"),
    ("run", ["--output", "{taken}"], "exists and is not empty; give a new directory or add --overwrite"),
    ("run", ["--images", "0"], "--images must be >= 1"),
    ("missing", [], "no such file or directory"),
], ids=["search", "half-written", "corrupt", "format", "output-exists", "images", "missing"])
def test_bad_export_is_one_line(bad_sources, tmp_path, capfd, source, extra, expected):
    out = tmp_path / "o"
    argv = [str(bad_sources.get(source, tmp_path / "nope"))]
    extra = [a.format(**{k: str(v) for k, v in bad_sources.items()}) for a in extra]
    if "--format" not in extra:
        argv += ["--format", "onnx"]
    if "--output" not in extra:
        argv += ["--output", str(out)]
    before = sorted(p.name for p in bad_sources["tmp"].rglob("*"))
    code = export.main(argv + extra)
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()
    assert sorted(p.name for p in bad_sources["tmp"].rglob("*")) == before
    assert not list(tmp_path.glob(".export-*"))
