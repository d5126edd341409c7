"""Retraining as a Determined trial: learning on real CIFAR-10, the search-to-retrain handoff,
and one-line errors for bad genotypes."""
import json
import re

import pytest

from tests.conftest import require_cifar
from tests.helpers import checkpoints, run_in_process, run_model_def, write_config

SMALL_DARTS = {"space": "darts", "global_batch_size": 32, "init_channels": 8, "layers": 5, "learning_rate": 0.05,
               "epochs": 4, "drop_path_prob": 0.1}


@pytest.mark.slow
def test_darts_v2_retraining_learns_on_real_cifar10(tmp_path):
    root = require_cifar()
    cfg = write_config(tmp_path / "exp.yaml", {"genotype": "DARTS_V2", **SMALL_DARTS},
                       {"dataset": "image_folder", "root": str(root), "subset": 3000, "test_subset": 500})
    # 200 steps of 32 (2026-12-07: val_accuracy 0.41, test_accuracy 0.37 on 500 test images)
    proc = run_model_def(str(cfg), "--max-batches", "200", "--validate-every", "200", "--output", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if "validation at step 200" in l][0]
    metrics = dict(re.findall(r"(\w+) ([0-9.e+-]+)", line.split(":", 1)[1]))
    # 10 classes: chance is 0.10
    assert float(metrics["val_accuracy"]) > 0.3 and float(metrics["test_accuracy"]) > 0.3, line
    assert float(metrics["params"]) < float(metrics["params_with_auxiliary"]) and float(metrics["macs"]) > 0
    assert 200 in checkpoints(tmp_path / "o")


@pytest.mark.slow
def test_search_genotype_json_feeds_a_retraining(tmp_path):
    search = write_config(tmp_path / "search.yaml",
                          {"global_batch_size": 16, "space": "darts", "epochs": 1,
                           "space_args": {"C": 4, "layers": 3, "partial_channels": 2, "edge_normalization": True}},
                          {"dataset": "digits", "subset": 200})
    proc = run_in_process(str(search), "--max-batches", "2", "--output", str(tmp_path / "s"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = checkpoints(tmp_path / "s")[2] / "genotype.json"
    genotype = json.loads(path.read_text())["genotype"]
    retrain = write_config(tmp_path / "retrain.yaml", {"genotype": str(path), **SMALL_DARTS, "epochs": 1},
                           {"dataset": "digits", "image_size": 32, "subset": 300, "test_subset": 50})
    proc = run_in_process(str(retrain), "--max-batches", "2", "--output", str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[retrain] genotype: {genotype}" in proc.stdout


@pytest.mark.parametrize("genotype,match", [
    ("Genotype(normal=[('sep_conv_3x3', 0)", "malformed DARTS genotype string"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|",
     "belongs to the nas-bench-201 search space, but this run uses the darts search space"),
    ("runs/missing/genotype.json", "genotype file 'runs/missing/genotype.json' does not exist"),
    ("DARTS_V9", "cannot read genotype 'DARTS_V9'"),
])
def test_bad_genotypes_get_one_line_errors(tmp_path, genotype, match):
    cfg = write_config(tmp_path / "exp.yaml", {"genotype": genotype, **SMALL_DARTS},
                       {"dataset": "digits", "image_size": 32, "subset": 300})
    proc = run_in_process(str(cfg), "--max-batches", "1", "--output", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
