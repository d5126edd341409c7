"""Every experiment YAML: valid for Determined 0.38.1 (offline schema check), no deprecated
fields, the fields this project relies on, and each sampled hyperparameter point builds its
trial and trains one batch locally."""
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nas_trial.config import RetrainConfig, SearchConfig
from nas_trial.runner import load_config, pick_hparams
from tests.helpers import ROOT, run_in_process

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
CHECKER = ROOT.parent / "shared" / "tools" / "expconf_check.py"


def test_there_are_the_expected_experiments():
    names = {p.stem for p in EXPERIMENTS}
    assert {"search-gaea-pcdarts-cifar10", "search-gaea-pcdarts-cifar10-distributed", "search-gaea-nb201-cifar10",
            "search-gaea-nb201-cifar100", "search-gaea-nb201-imagenet16", "ablation-nb201", "retrain-darts-cifar10",
            "retrain-nb201", "retrain-darts-asha", "retrain-nb201-asha", "quickstart", "retrain-darts-imagenet",
            "search-gaea-pcdarts-budget-front"} <= names


def test_configs_pass_determineds_own_schemas():
    if not CHECKER.exists():
        pytest.skip(f"{CHECKER} not found")
    proc = subprocess.run([sys.executable, str(CHECKER), "--strict", *map(str, EXPERIMENTS)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK ") == len(EXPERIMENTS)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_config_fields(path):
    cfg = load_config(path)
    assert cfg["entrypoint"] == "python3 -m determined.launch.torch_distributed python3 model_def.py"
    for deprecated in ("records_per_epoch", "min_validation_period", "min_checkpoint_period", "scheduling_unit"):
        assert deprecated not in cfg
    assert "max_length" not in cfg["searcher"]
    assert "max_restarts" in cfg and "checkpoint_storage" in cfg and "checkpoint_policy" in cfg
    assert cfg["data"].get("root") or cfg["data"].get("dataset") == "digits"
    text = path.read_text()
    assert "e-" not in "".join(l.split("#")[0] for l in text.splitlines() if "1e-" in l or "0e-" in l and ".0e-" not in l)
    if cfg["searcher"]["name"] == "adaptive_asha":
        s = cfg["searcher"]
        assert s["time_metric"] == "epochs" and s["max_time"] == cfg["hyperparameters"]["epochs"]
        assert s["max_trials"] and s["max_rungs"] and s["divisor"]
        assert s["metric"] == "val_accuracy" and s["smaller_is_better"] is False
    hp = cfg["hyperparameters"]
    assert "global_batch_size" in hp
    assert cfg["environment"]["image"] == IMAGES        # never Determined's default image


def _dockerfile_tags() -> dict[str, str]:
    """The tags docker/Dockerfile's build commands give its CUDA and CPU variants."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    tags = re.findall(r"-t (\S+) \.", text)
    return {"cuda": next(t for t in tags if "cuda" in t), "cpu": next(t for t in tags if t.endswith("-cpu"))}


IMAGES = _dockerfile_tags()


def test_images_carry_the_pinned_torch_and_determined_and_the_readme_names_them():
    pins = dict(l.split("==") for l in (ROOT / "requirements.txt").read_text().splitlines() if "==" in l)
    readme = (ROOT / "README.md").read_text()
    for tag in IMAGES.values():
        assert f"torch{pins['torch']}" in tag and f"det{pins['determined']}" in tag
        assert tag in readme
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for pkg in ("torch", "torchvision", "determined"):
        assert f"{pkg}=={pins[pkg]}" in dockerfile


def _points(spec: dict) -> list[dict]:
    """Grid: every combination of categorical values; ASHA: the low and high corners of every
    range (with the first and last categorical values); everything else: the one point."""
    ranged = {k: v for k, v in spec.items() if isinstance(v, dict) and v.get("type") in ("int", "double", "log")}
    cats = {k: v["vals"] for k, v in spec.items() if isinstance(v, dict) and v.get("type") == "categorical"}
    base = pick_hparams(spec)
    points = []
    if ranged:
        for end in ("minval", "maxval"):
            p = dict(base)
            for k, v in ranged.items():
                x = v[end]
                p[k] = float(v.get("base", 10)) ** x if v["type"] == "log" else x
            for k, vals in cats.items():
                p[k] = vals[0] if end == "minval" else vals[-1]
            points.append(p)
    else:
        for combo in itertools.product(*cats.values()):
            points.append({**base, **dict(zip(cats, combo))})
    return points or [base]


def _config_cls(hp):
    return RetrainConfig if "genotype" in hp else SearchConfig


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_sampled_point_is_a_valid_config(path):
    for point in _points(load_config(path)["hyperparameters"]):
        cfg = _config_cls(point).from_hparams(point)
        if isinstance(cfg, RetrainConfig):
            from search_spaces import parse_genotype
            cfg.resolve(parse_genotype(cfg.genotype, space=cfg.space).space)


def _cases():
    for path in EXPERIMENTS:
        points = _points(load_config(path)["hyperparameters"])
        seen = set()
        for i, point in enumerate(points):
            key = point.get("optimizer"), tuple(sorted((k, str(v)) for k, v in point.items() if k != "seed"))
            if key in seen:
                continue
            seen.add(key)
            yield pytest.param(path, point, id=f"{path.stem}-{i}")


def _set_args(point: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in point.items():
        if isinstance(v, dict):
            out += _set_args(v, f"{prefix}{k}.")
        else:
            out += ["--set", f"{prefix}{k}={v!r}" if isinstance(v, str) and v.startswith("|") else f"{prefix}{k}={v}"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path,point", list(_cases()))
def test_trial_of_each_point_trains_one_batch(tmp_path, path, point):
    """The trial each sampled point builds, at the YAML's model sizes, on offline digits
    (resized to 32x32 where a DARTS evaluation network's auxiliary head needs it), through the
    command line's own ``main`` in this process. A DARTS retraining point trains its batch at
    16 images: its 20-cell network at the YAMLs' 96-256 took up to 76 s a point on 2 CPU
    cores, and the batch size changes no code path."""
    retrain = "genotype" in point
    if retrain and point.get("space") == "darts":
        point = {**point, "global_batch_size": 16}
    subset = 2 * int(point["global_batch_size"]) + 100   # one global batch in the training part
    data = ["--set", "data.dataset=digits", "--set", f"data.subset={subset}", "--set", "data.test_subset=60",
            "--set", "data.num_workers=0"]
    if retrain and point.get("space") == "darts":
        data += ["--set", f"data.image_size={224 if point.get('variant') == 'imagenet' else 32}"]
    proc = run_in_process(str(path), *_set_args(point), *data, "--max-batches", "1", "--output", str(tmp_path / "o"),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "finished at batch 1" in proc.stdout and "validation at step 1" in proc.stdout


REFERENCE_NB201 = {  # liamcli/gaea_release: configs/cnn/mode/search_nasbench201.yaml, edarts method, README command
    "global_batch_size": 64, "space_args": {"C": 24, "layers": 5, "exclude_none": True}, "optimizer": "gaea",
    "optimizer_args": {"gaea": {"lr": 0.1}}, "bilevel": False, "learning_rate": 0.025, "min_learning_rate": 0.001,
    "momentum": 0.9, "weight_decay": 3.0e-4, "grad_clip": 5.0, "epochs": 25, "schedule_epochs": 50}


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if p.stem.startswith("search-gaea-nb201")], ids=lambda p: p.stem)
def test_nb201_searches_follow_the_reference_protocol(path):
    """The README's 'Protocol fidelity' table: what it calls 'the same' is in the YAMLs."""
    hp = load_config(path)["hyperparameters"]
    assert {k: hp[k] for k in REFERENCE_NB201} == REFERENCE_NB201
    assert SearchConfig.from_hparams(hp).schedule_epochs == 50
