"""What a run shows: cell diagrams, TensorBoard event files read back with TensorBoard's own
reader, the run report and the cost, for searches (DARTS with edge weights, NAS-Bench-201,
GDAS) and retraining."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import search_spaces
from search_spaces import parse_genotype
from tests.conftest import require_cifar
from tests.helpers import ROOT, checkpoints, load_state, run_in_process, write_config

NB201 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|skip_connect~1|+|nor_conv_1x1~0|none~1|avg_pool_3x3~2|"
COST_KEYS = {"wall_s", "s_per_step", "images_per_s", "peak_memory_gb", "device", "device_count", "device_hours"}


def not_blank(png: Path) -> None:
    image = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert image.shape[0] > 100 and image.shape[1] > 100
    inked = (image < 200).mean()
    assert 0.005 < inked < 0.6, f"{png}: {inked:.4f} of the pixels are drawn"


def svg_texts(svg: Path) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg.read_text())


def ops_of(genotype) -> list[str]:
    if genotype.space == "darts":
        return [op for op, _ in genotype.normal + genotype.reduce]
    return [op for op, _ in genotype.edges]


@pytest.mark.parametrize("spec", ["DARTS_V2", "PC_DARTS", NB201])
def test_cell_diagram_draws_every_edge_with_its_op(tmp_path, spec):
    genotype = parse_genotype(spec)
    png, svg = tmp_path / "cell.png", tmp_path / "cell.svg"
    for path in (png, svg):
        proc = subprocess.run([sys.executable, "-m", "search_spaces", "describe", spec, "--plot", str(path)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["plot"] == str(path)
    not_blank(png)
    texts = svg_texts(svg)
    labels = [t for t in texts if t in search_spaces.DARTS_OPS + search_spaces.NB201_OPS]
    assert sorted(labels) == sorted(ops_of(genotype))          # one label per edge, every op named
    if genotype.space == "darts":
        assert {"normal cell", "reduction cell", "c_{k}", "0: c_{k-2}", "1: c_{k-1}"} <= set(texts)


@pytest.mark.parametrize("args,match", [
    (["--plot", "cell.jpg"], "must end in .png or .svg"),
    (["--plot", "no/such/dir/cell.png"], "does not exist"),
    (["--init-channels", "-4"], "--init-channels must be >= 1"),
    (["--layers", "0"], "--layers must be >= 1"),
])
def test_describe_bad_arguments_are_one_line(tmp_path, args, match):
    proc = subprocess.run([sys.executable, "-m", "search_spaces", "describe", "DARTS_V2", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and match in proc.stderr and "Traceback" not in proc.stderr


def read_events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def report_links_exist(report: Path) -> list[str]:
    text = report.read_text()
    links = re.findall(r"(?:src|href)='([^']+)'", text)
    for link in links:
        assert (report.parent / link).is_file(), link
    for png in (l for l in links if l.endswith(".png")):
        not_blank(report.parent / png)
    return links


@pytest.mark.slow
def test_search_writes_tensorboard_report_and_cost(tmp_path):
    """PC-DARTS (edge weights) on the real CIFAR-10 JPEGs: genotype.json, event files, report, cost."""
    root = require_cifar()
    cfg = write_config(tmp_path / "exp.yaml",
                       {"global_batch_size": 16, "space": "darts", "optimizer": "gaea", "epochs": 2,
                        "space_args": {"C": 4, "layers": 3, "partial_channels": 2, "edge_normalization": True}},
                       {"dataset": "image_folder", "root": str(root), "subset": 300})
    out = tmp_path / "out"
    proc = run_in_process(str(cfg), "--max-batches", "6", "--validate-every", "3", "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    acc = read_events(out / "tensorboard")
    scalars = set(acc.Tags()["scalars"])
    for ct in ("normal", "reduce"):
        for edge in search_spaces.edge_names("darts"):
            for op in search_spaces.DARTS_OPS:
                tag = f"arch/{ct}/{edge}/{op}"
                assert tag in scalars and [e.step for e in acc.Scalars(tag)] == [3, 6], tag
            assert f"arch_edge/{ct}/{edge}" in scalars
        assert [e.step for e in acc.Images(f"arch_weights/{ct}")] == [3, 6]
    # genotype.json, what a retraining reads (local runs checkpoint after every validation too)
    ckpts = checkpoints(out)
    assert max(ckpts) == 6 and "genotype.json:" in proc.stdout and "validation at step 3" in proc.stdout
    final = json.loads((ckpts[6] / "genotype.json").read_text())
    assert final["genotype"] == parse_genotype(str(ckpts[6] / "genotype.json"), space="darts").to_str()
    assert final["step"] == 6 and 0.0 <= final["metrics"]["val_accuracy"] <= 1.0
    assert set(final["metrics"]) >= {"val_loss", "val_accuracy", "arch_entropy", "arch_max_weight", "genotype"}
    for ct in ("normal", "reduce"):
        ops = np.array(final["arch_weights"][ct]["ops"])
        assert ops.shape == (14, 8) and np.allclose(ops.sum(-1), 1, atol=1e-5)
        assert [len(e) for e in final["arch_weights"][ct]["edges"]] == [2, 3, 4, 5]
    # the event files hold the architecture weights the checkpoint holds (GAEA: rows on the simplex)
    row = [acc.Scalars(f"arch/normal/3<-1/{op}")[-1].value for op in search_spaces.DARTS_OPS]
    assert np.allclose(row, final["arch_weights"]["normal"]["ops"][3], atol=1e-6) and abs(sum(row) - 1) < 1e-5
    assert {"arch/entropy", "arch/max_weight", "Determined/loss", "Determined/val_accuracy"} <= scalars
    assert [e.step for e in acc.Images("cell")] == [3, 6]
    assert acc.Tags()["tensors"] == ["genotype/text_summary"]
    # cost: in the validation metrics, in genotype.json, printed with the validation
    assert COST_KEYS <= set(final["cost"]) and final["cost"]["steps"] == 6
    assert final["cost"]["s_per_step"] > 0 and final["cost"]["peak_memory_gb"] > 0.1
    assert final["cost"]["device_hours"] == pytest.approx(final["cost"]["wall_s"] / 3600)
    assert {f"cost_{k}" for k in COST_KEYS} <= set(final["metrics"])
    # the report: printed, every link a real non-blank picture, the trajectories from step 0
    report = out / "report.html"
    assert f"[search] report: {report}" in proc.stdout
    links = report_links_exist(report)
    assert {"curves.png", "entropy.png", "trajectories-normal.png", "trajectories-reduce.png", "cell.png"} == set(links)
    history = load_state(checkpoints(out)[6])["callbacks"]["observe"]["history"]
    assert [a["step"] for a in history["arch"]] == [0, 3, 6]
    assert [v["step"] for v in history["validation"]] == [3, 6]


@pytest.mark.slow
def test_resumed_search_reports_the_whole_history_and_gdas_probabilities(tmp_path):
    cfg = write_config(tmp_path / "exp.yaml",
                       {"global_batch_size": 16, "space": "nas-bench-201", "space_args": {"C": 4, "layers": 1},
                        "optimizer": "gdas", "epochs": 2, "seed": 0},
                       {"dataset": "digits", "subset": 400})
    out = tmp_path / "out"
    proc = run_in_process(str(cfg), "--max-batches", "4", "--validate-every", "2", "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_in_process(str(cfg), "--max-batches", "8", "--validate-every", "2", "--output", str(out),
                         "--resume", str(checkpoints(out)[4]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = load_state(checkpoints(out)[8])["callbacks"]["observe"]["history"]
    assert [v["step"] for v in history["validation"]] == [2, 4, 6, 8]
    assert history["arch"][-1]["sampled"] is True
    cost = json.loads((checkpoints(out)[8] / "genotype.json").read_text())["cost"]
    assert cost["steps"] == 8                                    # both sessions counted
    acc = read_events(out / "tensorboard")
    tag = "arch/normal/2<-1/nor_conv_3x3"
    assert sorted({e.step for e in acc.Scalars(tag)}) == [2, 4, 6, 8]
    probs = [acc.Scalars(f"arch/normal/2<-1/{op}")[-1].value for op in search_spaces.NB201_OPS]
    assert abs(sum(probs) - 1) < 1e-5                            # GDAS: softmax sampling probabilities
    links = report_links_exist(out / "report.html")
    assert "trajectories-normal.png" in links


@pytest.mark.slow
def test_retraining_report_and_tensorboard(tmp_path):
    cfg = write_config(tmp_path / "exp.yaml",
                       {"genotype": NB201, "init_channels": 4, "layers": 1, "global_batch_size": 16, "epochs": 1},
                       {"dataset": "digits", "subset": 300, "test_subset": 50})
    out = tmp_path / "out"
    proc = run_in_process(str(cfg), "--max-batches", "4", "--validate-every", "2", "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cost_s_per_step" in proc.stdout and "cost_device_hours" in proc.stdout
    acc = read_events(out / "tensorboard")
    assert {"Determined/loss", "Determined/val_accuracy", "Determined/val_test_accuracy"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("cell")] == [2]           # the trained cell, once
    links = report_links_exist(out / "report.html")
    assert set(links) == {"curves.png", "cell.png"}
    assert "The cell this run trains" in (out / "report.html").read_text()


def test_on_a_cluster_the_pictures_go_through_determineds_writer(tmp_path, monkeypatch):
    """On a cluster the observer writes into the trial context's TensorBoard writer (the one
    Determined uploads for ``det tensorboard``), and leaves the metrics to Determined."""
    from types import SimpleNamespace

    import torch
    from torch.utils.tensorboard import SummaryWriter

    from nas_trial import observe
    writer = SummaryWriter(str(tmp_path / "tb"))
    context = SimpleNamespace(device=torch.device("cpu"), get_tensorboard_writer=lambda: writer)
    arch = {"space": "nas-bench-201", "op_names": list(search_spaces.NB201_OPS), "sampled": False,
            "cells": {"normal": {"ops": [[0.2] * 5] * 6, "edges": None}}}
    trial = SimpleNamespace(per_slot=8, world=1, rank=0, context=context, steps=12, arch_snapshot=lambda: arch)
    monkeypatch.setattr(observe.det, "get_cluster_info", lambda: SimpleNamespace(task_type="TRIAL"))
    obs = observe.Observer(trial)
    assert obs.on_cluster
    obs.on_validation_start()
    obs.on_validation_end({"val_accuracy": 0.5, "arch_entropy": 1.6, "genotype": NB201})
    writer.flush()
    acc = read_events(tmp_path / "tb")
    scalars = set(acc.Tags()["scalars"])
    assert "arch/normal/3<-2/avg_pool_3x3" in scalars and "arch/entropy" in scalars
    assert not any(t.startswith("Determined/") for t in scalars)      # Determined writes those itself
    assert [e.step for e in acc.Images("cell")] == [12] and [e.step for e in acc.Images("arch_weights/normal")] == [12]
