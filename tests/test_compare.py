"""benchmarks/compare.py as the README runs it, scaled down to seconds."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import require_cifar
from tests.helpers import ROOT


@pytest.mark.slow
def test_compare_writes_json_lines_per_epoch_and_a_table(tmp_path):
    """Random search: its selection runs on the real, class-ordered held-out half here."""
    from tests.benchmark_files import accuracies, write_csv
    from tests.test_nb201_benchmark import EVERY_CELL

    root = require_cifar()
    results = tmp_path / "results.jsonl"
    bench = write_csv(tmp_path / "every-cell.csv", EVERY_CELL)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--methods", "random",
                           "--benchmark", str(bench),
                           "--seeds", "0", "--data", str(root), "--output", str(tmp_path / "runs"), "--results",
                           str(results), "--set", "epochs=2", "--set", "data.subset=400",
                           "--set", "space_args.C=4"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["method"], r["seed"], r["returncode"]) for r in runs] == [("random", 0, 0)]
    for r in runs:
        assert [e["epoch"] for e in r["epochs"]] == [1.0, 2.0]
        for e in r["epochs"]:
            assert e["genotype"].startswith("|") and 0 <= e["skip_share"] <= 1 and 0 <= e["pool_share"] <= 1
            assert 0 <= e["val_accuracy"] <= 1 and e["arch_entropy"] > 0 and e["wall_s"] > 0
            assert e["benchmark_test_accuracy"] == pytest.approx(accuracies(e["genotype"], "cifar10", 200)[1])
        assert r["final_genotype"] == r["epochs"][-1]["genotype"]
        assert r["final_benchmark_test_accuracy"] == r["epochs"][-1]["benchmark_test_accuracy"]
    assert "| random | 1 |" in proc.stdout and "benchmark test acc (%)" in proc.stdout
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--table", str(results)],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and table.stdout.count("\n") == 3
