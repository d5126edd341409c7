"""Several searches to one retraining experiment: ``python -m nas_trial candidates`` and the
ASHA plans the YAMLs print."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nas_trial import asha
from nas_trial.candidates import CandidatesError, build, collect, rank
from nas_trial.runner import load_config
from search_spaces import DartsGenotype, parse_genotype
from tests.conftest import require_cifar
from tests.helpers import ROOT, checkpoints, run_in_process, write_config

CHECKER = ROOT.parent / "shared" / "tools" / "expconf_check.py"
NB201_BASE = ROOT / "experiments" / "retrain-nb201-asha.yaml"
DARTS_BASE = ROOT / "experiments" / "retrain-darts-asha.yaml"
A = "|nor_conv_3x3~0|+|nor_conv_3x3~0|skip_connect~1|+|nor_conv_1x1~0|nor_conv_3x3~1|avg_pool_3x3~2|"
B = "|skip_connect~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_1x1~0|nor_conv_3x3~1|nor_conv_3x3~2|"
C = "|none~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_1x1~0|nor_conv_3x3~1|nor_conv_3x3~2|"


def fake_checkpoint(root: Path, run: str, uuid: str, genotype: str, step: int, accuracy=None, seed=0,
                    with_run_field=True) -> Path:
    """A checkpoint folder as a local search writes it: <run>/determined/<uuid>/genotype.json."""
    d = root / run / "determined" / uuid
    d.mkdir(parents=True)
    g = parse_genotype(genotype)
    data = {**g.to_json(), "step": step, "seed": seed, "optimizer": "gaea",
            "metrics": {} if accuracy is None else {"val_accuracy": accuracy}}
    if with_run_field:
        data["run"] = str(root / run)
    (d / "genotype.json").write_text(json.dumps(data))
    return d


def candidates_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas_trial", "candidates", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


# ------------------------------------------------------------------------ ASHA plans
def test_asha_plan_follows_the_masters_rules():
    """retrain-darts-asha.yaml's searcher, worked by hand from adaptive_asha.go / asha_stopping.go:
    max_rungs min(4, int(log 600/log 3)+1 = 6, int(log 32/log 3)+1 = 4) = 4; standard mode gives
    brackets of 4, 3, 2 rungs; weights 27/4, 9/3, 3/2 of 32 trials -> 19, 8, 4 + remainder 1."""
    p = asha.plan(load_config(DARTS_BASE)["searcher"])
    assert [b.trials for b in p.brackets] == [20, 8, 4]
    assert [b.rungs for b in p.brackets] == [(22, 66, 200, 600), (66, 200, 600), (200, 600)]
    assert [b.max_concurrent_trials for b in p.brackets] == [3, 3, 2]
    assert 3850 < p.expected_units < 3950 and p.max_units == 32 * 600
    aggressive = asha.plan({"name": "adaptive_asha", "max_trials": 27, "max_time": 200, "time_metric": "epochs",
                            "divisor": 3, "max_rungs": 4, "mode": "aggressive"})
    assert [b.rungs for b in aggressive.brackets] == [(7, 22, 66, 200)] and aggressive.trials == 27
    # the defaults (divisor 4, max_rungs 5) and the cap by max_trials: log(10)/log(4) -> 2 rungs
    small = asha.plan({"name": "adaptive_asha", "max_trials": 10, "max_time": 100, "time_metric": "batches",
                       "mode": "conservative"})
    assert [b.rungs for b in small.brackets] == [(25, 100), (100,)] and small.trials == 10


ASHA_EXPERIMENTS = [p for p in sorted((ROOT / "experiments").glob("*.yaml"))
                    if load_config(p)["searcher"]["name"] == "adaptive_asha"]


def test_asha_comments_are_the_computed_plan():
    assert {p.stem for p in ASHA_EXPERIMENTS} >= {"retrain-darts-asha", "retrain-nb201-asha"}
    for path in ASHA_EXPERIMENTS:
        assert asha.plan(load_config(path)["searcher"]).comment() in path.read_text(), path


def test_asha_plan_errors():
    with pytest.raises(ValueError, match="not adaptive_asha"):
        asha.plan({"name": "single"})
    with pytest.raises(ValueError, match="max_time"):
        asha.plan({"name": "adaptive_asha", "max_trials": 4, "time_metric": "epochs"})


# ------------------------------------------------------------------- ranking, dedup
def test_darts_genotypes_equal_up_to_edge_order_are_one_candidate():
    g = parse_genotype("DARTS_V2")
    swapped = DartsGenotype(tuple(e for k in range(0, 8, 2) for e in reversed(g.normal[k:k + 2])), g.normal_concat,
                            g.reduce, g.reduce_concat)
    assert swapped.to_str() != g.to_str() and swapped.canonical() == g.canonical()
    assert parse_genotype("DARTS_V1").canonical() != g.canonical()


def test_ranking_deduplicates_and_orders_by_search_accuracy(tmp_path):
    fake_checkpoint(tmp_path, "run1", "u1", A, step=10, accuracy=0.30)
    fake_checkpoint(tmp_path, "run1", "u2", B, step=20, accuracy=0.50)
    fake_checkpoint(tmp_path, "run2", "u3", A, step=10, accuracy=0.60)     # A again, scored higher
    fake_checkpoint(tmp_path, "run2", "u4", C, step=20, accuracy=None)     # never validated: last
    found = collect([str(tmp_path / "run1"), str(tmp_path / "run2")])
    assert len(found) == 4
    chosen = rank(found, top=5)
    assert [f.genotype.to_str() for f in chosen] == [A, B, C]           # distinct, best first
    assert chosen[0].checkpoint == "u3" and chosen[0].search_accuracy == 0.60
    assert [f.checkpoint for f in rank(found, top=2)] == ["u3", "u2"]
    # each run's final checkpoint only: run1 -> B (0.5), run2 -> C (unknown accuracy)
    assert [f.checkpoint for f in rank(found, top=5, pick="final")] == ["u2", "u4"]


def test_sources_of_every_kind_and_each_file_once(tmp_path):
    ck = fake_checkpoint(tmp_path, "run1", "u1", A, step=10, accuracy=0.3)
    fake_checkpoint(tmp_path, "run1", "u2", B, step=20, accuracy=0.4)
    # a folder of downloaded checkpoints (det checkpoint download -o downloads/<name>): no run layout,
    # the run comes from genotype.json
    dl = tmp_path / "downloads" / "best-of-trial-7"
    dl.mkdir(parents=True)
    (dl / "genotype.json").write_text((ck / "genotype.json").read_text())
    found = collect([str(tmp_path / "run1"), str(ck), str(ck / "genotype.json"), str(tmp_path / "downloads")])
    assert len(found) == 3                              # run1's two files (named three times) + the download
    assert {f.run for f in found} == {str(tmp_path / "run1")}
    # a genotype.json without the run field (older searches): the run is the folder holding determined/
    fake_checkpoint(tmp_path, "old", "u9", C, step=5, accuracy=0.1, with_run_field=False)
    assert collect([str(tmp_path / "old")])[0].run == str(tmp_path / "old")


def test_built_yaml_changes_only_genotype_candidates_and_description(tmp_path):
    fake_checkpoint(tmp_path, "r", "u1", A, step=10, accuracy=0.3, seed=3)
    fake_checkpoint(tmp_path, "r", "u2", B, step=20, accuracy=0.4, seed=3)
    found = collect([str(tmp_path / "r")])
    base = load_config(NB201_BASE)
    config, comment = build(found, rank(found, 2), base, str(NB201_BASE), "best")
    assert config["hyperparameters"]["genotype"] == {"type": "categorical", "vals": [B, A]}
    prov = config["hyperparameters"]["candidates"]["val"]
    assert [p["rank"] for p in prov] == [1, 2] and prov[0]["checkpoint"] == "u2" and prov[0]["seed"] == 3
    assert prov[0]["search_accuracy"] == 0.4 and prov[0]["step"] == 20 and prov[0]["run"] == str(tmp_path / "r")
    rest = {k: v for k, v in config.items() if k != "description"}
    rest["hyperparameters"] = {k: v for k, v in rest["hyperparameters"].items() if k not in ("genotype", "candidates")}
    expected = {**base, "hyperparameters": {k: v for k, v in base["hyperparameters"].items() if k != "genotype"}}
    assert rest == expected
    assert asha.plan(base["searcher"]).comment() in comment and "u2" in config["description"]


@pytest.mark.parametrize("case,expect", [
    ("mixed", "mix search spaces"),
    ("retrain_space", "retrains the darts space"),
    ("search_base", "is not a retraining"),
    ("single_base", "'single' searcher"),
    ("missing", "does not exist"),
    ("empty_dir", "no genotype.json below"),
    ("bad_json", "not a readable genotype.json"),
    ("bad_genotype", "unknown op"),
    ("top0", "--top must be >= 1"),
    ("output_dir", "is a directory"),
])
def test_errors_are_one_line_exit_2(tmp_path, case, expect):
    nb = fake_checkpoint(tmp_path, "nb", "u1", A, step=1, accuracy=0.1)
    out = str(tmp_path / "out.yaml")
    args = [str(tmp_path / "nb"), "--top", "2", "--base", str(NB201_BASE), "--output", out]
    if case == "mixed":
        d = tmp_path / "darts" / "determined" / "u"
        d.mkdir(parents=True)
        (d / "genotype.json").write_text(json.dumps(parse_genotype("DARTS_V2").to_json()))
        args[0:1] = [str(tmp_path / "nb"), str(tmp_path / "darts")]
    elif case == "retrain_space":
        args[args.index("--base") + 1] = str(DARTS_BASE)
    elif case == "search_base":
        args[args.index("--base") + 1] = str(ROOT / "experiments" / "search-gaea-nb201-cifar10.yaml")
    elif case == "single_base":
        args[args.index("--base") + 1] = str(ROOT / "experiments" / "retrain-nb201.yaml")
    elif case == "missing":
        args[0] = str(tmp_path / "nope")
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif case == "bad_json":
        (nb / "genotype.json").write_text("{trunc")
    elif case == "bad_genotype":
        (nb / "genotype.json").write_text(json.dumps({"space": "nas-bench-201", "genotype": A.replace("skip", "skop")}))
    elif case == "top0":
        args[args.index("--top") + 1] = "0"
    elif case == "output_dir":
        args[args.index("--output") + 1] = str(tmp_path)
    proc = candidates_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not Path(out).exists()


def test_rank_rejects_bad_pick():
    with pytest.raises(CandidatesError, match="--pick"):
        rank([], 1, pick="worst")


# ------------------------------------------------------------- end to end, real data
@pytest.mark.slow
def test_two_searches_to_one_checked_yaml_that_retrains_each_candidate(tmp_path):
    root = require_cifar()
    cfg = write_config(tmp_path / "search.yaml",
                       {"global_batch_size": 16, "space": "nas-bench-201", "space_args": {"C": 4, "layers": 1},
                        "optimizer": "gaea", "optimizer_args": {"gaea": {"lr": 10.0}}, "epochs": 2,
                        "learning_rate": 0.05, "seed": 0},
                       {"dataset": "image_folder", "root": str(root), "subset": 300})
    for name, seed in (("s0", 0), ("s1", 1)):
        proc = run_in_process(str(cfg), "--max-batches", "6", "--validate-every", "3", "--set", f"seed={seed}",
                             "--output", str(tmp_path / name), cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = {json.loads((d / "genotype.json").read_text())["genotype"]
               for name in ("s0", "s1") for d in checkpoints(tmp_path / name).values()}
    out = tmp_path / "candidates.yaml"
    proc = candidates_cli(str(tmp_path / "s0"), str(tmp_path / "s1"), "--top", "2", "--base", str(NB201_BASE),
                          "--output", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ranked by the search's own validation accuracy" in proc.stdout
    check = subprocess.run([sys.executable, str(CHECKER), "--strict", str(out)], capture_output=True, text=True)
    assert check.returncode == 0 and "OK " in check.stdout, check.stdout + check.stderr
    config = load_config(out)
    vals = config["hyperparameters"]["genotype"]["vals"]
    prov = config["hyperparameters"]["candidates"]["val"]
    assert len(vals) == min(2, len(written)) and set(vals) <= written and len(set(vals)) == len(vals)
    accs = [p["search_accuracy"] for p in prov]
    assert accs == sorted(accs, reverse=True) and {p["seed"] for p in prov} <= {0, 1}
    for p in prov:
        assert p["run"] in (str(tmp_path / "s0"), str(tmp_path / "s1"))
        assert (Path(p["run"]) / "determined" / p["checkpoint"] / "genotype.json").exists()
    for i, genotype in enumerate(vals):
        proc = run_in_process(str(out), "--set", f"genotype={genotype!r}", "--set", "init_channels=4", "--set",
                             "layers=1", "--set", "global_batch_size=16", "--set", f"data.root={root}", "--set",
                             "data.subset=200", "--set", "data.test_subset=50", "--set", "data.num_workers=0",
                             "--max-batches", "2", "--output", str(tmp_path / f"r{i}"), cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"[retrain] genotype: {genotype}" in proc.stdout
        assert f"candidate_rank {i + 1}" in proc.stdout and f"candidate_checkpoint {prov[i]['checkpoint']}" in proc.stdout
        assert f"candidate_seed {prov[i]['seed']}" in proc.stdout and "candidate_optimizer gaea" in proc.stdout


@pytest.mark.parametrize("base", [DARTS_BASE, ROOT / "experiments" / "retrain-darts-imagenet.yaml"],
                         ids=["cifar", "imagenet"])
def test_darts_candidates_yaml_passes_determineds_schemas(tmp_path, base):
    """CIFAR-10 search cells into the CIFAR and the 8-GPU ImageNet retraining, unchanged."""
    fake_checkpoint(tmp_path, "r", "u1", parse_genotype("DARTS_V2").to_str(), step=10, accuracy=0.3)
    fake_checkpoint(tmp_path, "r", "u2", parse_genotype("PC_DARTS").to_str(), step=20, accuracy=0.5)
    fake_checkpoint(tmp_path, "r2", "u3", parse_genotype("PC_DARTS").canonical().to_str(), step=20, accuracy=0.4)
    out = tmp_path / "c.yaml"
    proc = candidates_cli(str(tmp_path / "r"), str(tmp_path / "r2"), "--top", "3", "--base", str(base),
                          "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "only 2 distinct genotype(s) found" in proc.stdout
    check = subprocess.run([sys.executable, str(CHECKER), "--strict", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    hp = load_config(out)["hyperparameters"]
    assert [parse_genotype(v, space="darts") for v in hp["genotype"]["vals"]] == [
        parse_genotype("PC_DARTS"), parse_genotype("DARTS_V2")]
    from nas_trial.config import RetrainConfig
    from nas_trial.runner import pick_hparams
    cfg = RetrainConfig.from_hparams(pick_hparams(hp))
    assert cfg.candidate_metrics(parse_genotype(cfg.genotype)) == {
        "candidate_rank": 1, "candidate_run": str(tmp_path / "r"), "candidate_checkpoint": "u2",
        "candidate_step": 20, "candidate_seed": 0, "candidate_optimizer": "gaea", "candidate_search_accuracy": 0.5}


def test_warm_up_genotypes_are_no_candidates_and_benchmark_scores_are_shown(tmp_path):
    """A genotype.json written during the weights-only warm-up (the argmax of a tie) is skipped;
    a NAS-Bench-201 search's benchmark score goes into the header and the provenance."""
    warm = fake_checkpoint(tmp_path, "run", "u1", A, 10, accuracy=0.3)
    data = json.loads((warm / "genotype.json").read_text())
    (warm / "genotype.json").write_text(json.dumps({**data, "warmup": "untouched"}))
    scored = fake_checkpoint(tmp_path, "run", "u2", B, 20, accuracy=0.2)
    data = json.loads((scored / "genotype.json").read_text())
    (scored / "genotype.json").write_text(json.dumps({**data, "benchmark": {"benchmark_test_accuracy": 93.5}}))
    found = collect([str(tmp_path / "run")])
    assert [f.genotype.to_str() for f in found] == [B]
    config, comment = build(found, rank(found, 2), load_config(NB201_BASE), str(NB201_BASE), "best")
    assert "benchmark test accuracy 93.50%" in comment
    assert config["hyperparameters"]["candidates"]["val"][0]["benchmark_test_accuracy"] == 93.5
    with pytest.raises(CandidatesError, match="weights-only warm-up"):
        collect([str(warm / "genotype.json")])
