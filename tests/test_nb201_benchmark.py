"""NAS-Bench-201 searches scored by the user's benchmark files: small files in each real
format (tests/benchmark_files.py), NAS-Bench-201 searches on the CIFAR-10 JPEGs from
../shared with each, the benchmark curve read back from the event files and genotype.json,
the weights-only warm-up marked, the look-up command and its one-line errors."""
import itertools
import json
import re
import subprocess
import sys

import pytest

from search_spaces.nb201_benchmark import Benchmark, BenchmarkError, BenchmarkSettings
from tests.benchmark_files import ALL_3X3, ALL_SKIP, WRITERS, accuracies, write_csv
from tests.conftest import require_cifar
from tests.helpers import ROOT, checkpoints, run_in_process, write_config
from tests.test_observe import read_events

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
EVERY_CELL = ["|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|".format(*ops) for ops in itertools.product(OPS, repeat=6)]
SEARCH = {"global_batch_size": 16, "space": "nas-bench-201", "space_args": {"C": 4, "layers": 1, "exclude_none": True},
          "optimizer": "gaea", "optimizer_args": {"gaea": {"lr": 3.0}}, "epochs": 3, "arch_warmup_epochs": 1,
          "learning_rate": 0.05, "seed": 0}


def _search(tmp_path, name, benchmark_file, extra=()):
    cfg = write_config(tmp_path / f"{name}.yaml", SEARCH,
                       {"dataset": "image_folder", "root": str(require_cifar()), "subset": 320})
    out = tmp_path / name
    proc = run_in_process(str(cfg), "--output", str(out), "--set", f"benchmark.file={benchmark_file}", *extra,
                          cwd=tmp_path, env={"NAS_DATA_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, out


@pytest.fixture(scope="module")
def csv_search(tmp_path_factory):
    """The search with a CSV of every cell: its cells are then written into the other formats."""
    tmp = tmp_path_factory.mktemp("bench")
    path = write_csv(tmp / "every-cell.csv", EVERY_CELL)
    proc, out = _search(tmp, "csv", path)
    return tmp, proc, out


def _validated(out):
    """genotype.json of each checkpoint (one per epoch), by step."""
    return {s: json.loads((ck / "genotype.json").read_text()) for s, ck in sorted(checkpoints(out).items())}


def _check_scored_run(proc, out, fmt):
    per_step = _validated(out)
    steps = sorted(per_step)
    assert len(steps) == 3                                     # 10 steps an epoch, one checkpoint each
    warm, scored = per_step[steps[0]], [per_step[s] for s in steps[1:]]
    # the warm-up: marked, no score; the argmax of its tie (the all-skip cell) is not reported as the cell
    assert "warmup" in warm and "benchmark_test_accuracy" not in warm["benchmark"]
    assert warm["genotype"] == ALL_SKIP
    assert "genotype: none yet: weights-only warm-up" in proc.stdout
    for g in scored:
        assert "warmup" not in g and g["benchmark"]["format"] == fmt and g["benchmark"]["dataset"] == "cifar10"
        valid, test = accuracies(g["genotype"], "cifar10", 200)
        assert g["benchmark"]["benchmark_test_accuracy"] == pytest.approx(test)
        assert g["benchmark"]["benchmark_valid_accuracy"] == pytest.approx(valid)
        assert g["metrics"]["benchmark_test_accuracy"] == pytest.approx(test)      # the validation's metrics
    events = read_events(out / "tensorboard")
    curve = {e.step: e.value for e in events.Scalars("Determined/val_benchmark_test_accuracy")}
    assert curve == pytest.approx({s: accuracies(per_step[s]["genotype"], "cifar10", 200)[1] for s in steps[1:]})
    assert (out / "benchmark.png").exists() and "benchmark.png" in (out / "report.html").read_text()
    return [g["genotype"] for g in scored]


@pytest.mark.slow
def test_search_with_a_csv_reports_the_benchmark_curve(csv_search):
    tmp, proc, out = csv_search
    _check_scored_run(proc, out, "csv")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nats", "pth"])
def test_search_with_the_benchmarks_own_files(csv_search, fmt, tmp_path):
    """The same search with a NATS-Bench topology directory and a NAS-Bench-201 .pth holding
    the all-skip and all-3x3 cells and the cells this search reaches: the same curve."""
    _, csv_proc, csv_out = csv_search
    cells = [ALL_SKIP, ALL_3X3] + [g["genotype"] for g in _validated(csv_out).values()]
    path = WRITERS[fmt](tmp_path, list(dict.fromkeys(cells)))
    proc, out = _search(tmp_path, fmt, path)
    kind = {"nats": "nats", "pth": "nas-bench-201"}[fmt]
    assert _check_scored_run(proc, out, kind) == _check_scored_run(csv_proc, csv_out, "csv")


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_lookup_of_known_cells_in_every_format(tmp_path, fmt, capfd):
    from search_spaces.__main__ import main

    path = WRITERS[fmt](tmp_path, [ALL_SKIP, ALL_3X3])
    for cell, (valid, test) in ((ALL_SKIP, (52.1, 54.30)), (ALL_3X3, (91.5, 94.37))):
        assert main(["lookup", cell, "--benchmark", str(path)]) == 0
        line = json.loads(capfd.readouterr().out)
        assert line["benchmark_test_accuracy"] == pytest.approx(test)
        assert line["benchmark_valid_accuracy"] == pytest.approx(valid)
    assert main(["lookup", ALL_3X3, "--benchmark", str(path), "--dataset", "cifar100", "--epochs", "12"]) == 0
    line = json.loads(capfd.readouterr().out)
    assert line["benchmark_test_accuracy"] == pytest.approx(accuracies(ALL_3X3, "cifar100", 12)[1])


def test_lookup_of_a_search_checkpoint(tmp_path, capfd):
    from search_spaces.__main__ import main

    path = write_csv(tmp_path / "b.csv", [ALL_3X3])
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "genotype.json").write_text(json.dumps({"space": "nas-bench-201", "genotype": ALL_3X3}))
    assert main(["lookup", str(ck), "--benchmark", str(path)]) == 0
    assert json.loads(capfd.readouterr().out)["benchmark_test_accuracy"] == pytest.approx(94.37)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "not-a-benchmark.pth").write_bytes(b"this is no torch file")
    (tmp / "columns.csv").write_text("cell,acc\nx,1\n")
    (tmp / "notes.txt").write_text("x")
    (tmp / "empty-dir").mkdir()
    write_csv(tmp / "two.csv", [ALL_SKIP, ALL_3X3])
    return tmp


@pytest.mark.parametrize("file,cell,expected", [
    ("missing.csv", ALL_3X3, "does not exist"),
    ("notes.txt", ALL_3X3, "is not one this project reads"),
    ("empty-dir", ALL_3X3, "has no meta.pickle.pbz2"),
    ("not-a-benchmark.pth", ALL_3X3, "cannot be read as NAS-Bench-201"),
    ("columns.csv", ALL_3X3, "needs 'arch' and 'test_accuracy' columns"),
    ("two.csv", "|nor_conv_1x1~0|+|nor_conv_1x1~0|nor_conv_1x1~1|+|nor_conv_1x1~0|nor_conv_1x1~1|nor_conv_1x1~2|",
     "holds no cell |nor_conv_1x1~0|"),
    ("two.csv", "DARTS_V2", "nas-bench-201"),
], ids=["missing", "other-kind", "empty-dir", "bad-pth", "csv-columns", "cell-not-held", "darts-genotype"])
def test_lookup_errors_are_one_line(bad_files, file, cell, expected, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "search_spaces", "lookup", cell, "--benchmark", str(bad_files / file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"NAS_DATA_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr, \
        proc.stderr[-2000:]


@pytest.mark.parametrize("sets,expected", [
    (["space=darts", "space_args={}"], "benchmark scores NAS-Bench-201 cells, and this search's space is 'darts'"),
    (["benchmark.dataset=mnist"], "benchmark.dataset 'mnist' is not one of cifar10, cifar100, ImageNet16-120"),
    (["benchmark.epochs=50"], "benchmark.epochs must be 12 or 200"),
    (["benchmark.file=/nonexistent/NATS-tss"], "does not exist"),
])
def test_search_benchmark_settings_are_one_line_errors(bad_files, tmp_path, sets, expected, capfd, monkeypatch):
    import model_def
    from nas_trial.runner import main

    cfg = write_config(tmp_path / "exp.yaml", {**SEARCH, "benchmark": {"file": str(bad_files / "two.csv")}},
                       {"dataset": "digits", "subset": 200})
    monkeypatch.chdir(tmp_path)
    argv = [str(cfg), "--output", str(tmp_path / "o"), "--max-batches", "1"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv, model_def.trial_class) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_benchmark_is_read_lazily_a_cell_at_a_time(tmp_path):
    """NATS-Bench: opening reads the cell list only; a look-up loads one cell's file and lets it go."""
    path = WRITERS["nats"](tmp_path, [ALL_SKIP, ALL_3X3])
    bench = Benchmark(BenchmarkSettings(str(path))).open()
    assert len(bench._api.arch2infos_dict) == 0
    assert bench.score(ALL_3X3).test_accuracy == pytest.approx(94.37)
    assert len(bench._api.arch2infos_dict) == 0
    with pytest.raises(BenchmarkError, match=re.escape(f"holds no cell {EVERY_CELL[0]}")):
        bench.score(EVERY_CELL[0])
