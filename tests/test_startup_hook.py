"""startup-hook.sh as Determined runs it (sourced under `set -e` and `set -x`, from the
experiment's directory, with DET_PYTHON_EXECUTABLE and DET_EXPERIMENT_CONFIG set), in a fake
image: modules can be made missing and pip either offline or working (it records its calls)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT
from nas_data import needs, sources

SITECUSTOMIZE = """
import os, sys
gone = set(filter(None, os.environ.get("FAKE_MISSING", "").split(",")))
done = os.environ.get("FAKE_INSTALLED")
if done and os.path.exists(done):
    gone -= set(open(done).read().split())
for m in gone:
    sys.modules[m] = None          # find_spec -> None, import -> ImportError
"""

FAKE_PIP = """
import os, sys
with open(os.environ["FAKE_PIP_CALLS"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ["FAKE_PIP"] == "offline":
    print("WARNING: Retrying (Retry(total=1)) after connection broken by 'NewConnectionError': Network is unreachable")
    print("ERROR: No matching distribution found for scikit-learn")
    sys.exit(1)
provides = {"scikit-learn": "sklearn", "pillow": "PIL"}
with open(os.environ["FAKE_INSTALLED"], "a") as f:
    f.write(" ".join(provides.get(a, a) for a in sys.argv[1:]) + "\\n")
"""


def _source_hook(tmp_path: Path, data: dict, missing: list[str], pip: str, then: str = ""):
    fake = tmp_path / "fake"
    (fake / "site" / "pip").mkdir(parents=True, exist_ok=True)
    (fake / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (fake / "site" / "pip" / "__init__.py").write_text("")
    (fake / "site" / "pip" / "__main__.py").write_text(FAKE_PIP)
    (fake / "bin").mkdir(exist_ok=True)
    det_python = fake / "bin" / "det-python"          # the image's python, as Determined names it
    det_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    det_python.chmod(0o755)
    for name in ("python3", "python", "pip", "pip3"):  # anything else on PATH must not be used
        (fake / "bin" / name).write_text("#!/bin/sh\necho \"$0 must not be called\" >&2\nexit 127\n")
        (fake / "bin" / name).chmod(0o755)
    calls = tmp_path / "pip-calls"
    env = {**os.environ, "PATH": f"{fake / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(fake / "site"),
           "DET_PYTHON_EXECUTABLE": str(det_python), "TMPDIR": str(tmp_path),
           "DET_EXPERIMENT_CONFIG": json.dumps({"name": "x", "data": data}),
           "FAKE_MISSING": ",".join(missing), "FAKE_PIP": pip, "FAKE_PIP_CALLS": str(calls),
           "FAKE_INSTALLED": str(tmp_path / "installed")}
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    script = 'set -e; set -x; source startup-hook.sh; echo "hook-done weights_only=$TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"'
    if then:
        script += f"; {then}"
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    pip_calls = calls.read_text().splitlines() if calls.exists() else []
    messages = [line for line in r.stderr.splitlines() if not line.startswith("+")]   # not set -x's trace
    return r, pip_calls, messages


def test_image_with_everything_installs_nothing_offline(tmp_path):
    # scikit-learn is missing but image_folder does not need it; pip is offline and never called
    r, pip_calls, messages = _source_hook(tmp_path, {"dataset": "image_folder"}, ["sklearn"], "offline")
    assert r.returncode == 0, r.stderr
    assert pip_calls == []
    assert messages == []
    assert "installing nothing" in r.stdout
    assert "startup-hook: torch" in r.stdout
    assert "hook-done weights_only=1" in r.stdout


def test_an_image_without_pyyaml_runs_the_cluster_path(tmp_path):
    """determined 0.38.1 brings ruamel.yaml, not PyYAML, and the hook does not install it: what
    a trial imports on a cluster (model_def.py as the entrypoint runs it, the runner's cluster
    path, every module the trials use) imports without it."""
    code = ("import model_def, nas_trial.runner, nas_trial.stopping, nas_trial.validation, nas_data, optimizers; "
            "print('cluster path imported')")
    r, pip_calls, messages = _source_hook(tmp_path, {"dataset": "image_folder"}, ["yaml"], "offline",
                                          then=f'"$DET_PYTHON_EXECUTABLE" -c "{code}"')
    assert r.returncode == 0, r.stderr[-2000:]
    assert pip_calls == [] and "installing nothing" in r.stdout
    assert "cluster path imported" in r.stdout


def test_missing_package_offline_stops_the_trial_with_one_line(tmp_path):
    r, pip_calls, messages = _source_hook(tmp_path, {"dataset": "digits"}, ["sklearn"], "offline")
    assert r.returncode != 0                        # set -e: the trial does not start
    assert "hook-done" not in r.stdout
    assert len(pip_calls) == 1
    args = pip_calls[0].split()
    assert args[:2] == ["install", "--user"]
    assert [a for a in args if not a.startswith("-") and not a.isdigit()] == ["install", "scikit-learn"]
    assert len(messages) == 1, r.stderr
    assert messages[0].startswith("startup-hook: error: could not install scikit-learn")
    assert "pip install --user" in messages[0] and "No matching distribution" in messages[0]
    assert "Traceback" not in r.stderr


def test_missing_package_is_installed_with_user_and_nothing_else(tmp_path):
    r, pip_calls, messages = _source_hook(tmp_path, {"dataset": "image_folder", "fallback": "digits"},
                                          ["sklearn"], "working")
    assert r.returncode == 0, r.stderr
    assert messages == []
    assert len(pip_calls) == 1
    args = pip_calls[0].split()
    assert args[:2] == ["install", "--user"]
    assert [a for a in args if not a.startswith("-") and not a.isdigit()] == ["install", "scikit-learn"]
    assert "installing scikit-learn (pip --user)" in r.stdout
    assert "hook-done weights_only=1" in r.stdout


def test_every_dataset_has_its_needs_listed():
    assert set(needs.BY_DATASET) == set(sources.dataset_names())


def test_a_searchs_benchmark_file_names_its_package():
    """The hook installs nats_bench or nas-bench-201 only when a search names such a file."""
    from search_spaces import nb201_benchmark

    assert set(needs.BY_BENCHMARK) == set(nb201_benchmark.FORMATS)
    config = lambda file: {"hyperparameters": {"benchmark": {"file": file, "dataset": "cifar10"}}}  # noqa: E731
    assert needs.benchmark_kind(config("/data/NATS-tss-v1_0-3ffb9-simple")) == "nats"
    assert needs.benchmark_kind(config("/data/NATS-tss-v1_0-3ffb9-simple.tar")) == "nats"
    assert needs.benchmark_kind(config("NAS-Bench-201-v1_1-096897.pth")) == "nas-bench-201"
    assert needs.benchmark_kind(config("scores.csv")) == "csv"
    assert needs.benchmark_kind({"hyperparameters": {"benchmark": {"type": "const", "val": {"file": "b.pth"}}}}) \
        == "nas-bench-201"
    assert needs.benchmark_kind({"hyperparameters": {}}) is None
    assert needs.needed(["cifar10"], "nats")["nats_bench"] == "nats_bench"
    assert needs.needed(["cifar10"], "nas-bench-201")["nas_201_api"] == "nas-bench-201"
    assert set(needs.needed(["cifar10"], "csv")) == set(needs.needed(["cifar10"]))


def test_needs_by_dataset_and_fallback():
    assert needs.datasets_of({}) == ["cifar10"]
    assert needs.datasets_of({"data": {"dataset": "image_folder", "fallback": "digits"}}) == ["image_folder", "digits"]
    assert "sklearn" not in needs.needed(["cifar10"])
    assert needs.needed(["image_folder", "digits"])["sklearn"] == "scikit-learn"
    with pytest.raises(needs.NeedsError, match="'mnist' is not one of"):
        needs.needed(["mnist"])


def test_requirements_pin_the_torch_the_hook_names():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == needs.TESTED_TORCH
