"""The search as a Determined trial, run through model_def.py like a user runs it."""
import json
import math
import re

import pytest

from nas_trial.health import first_non_finite
from nas_trial.runner import apply_overrides, load_config, pick_hparams
from tests.helpers import checkpoints, load_state, run_in_process, run_model_def, write_config

TINY = {"global_batch_size": 16, "space": "nas-bench-201", "space_args": {"C": 4, "layers": 1},
        "optimizer": "gaea", "epochs": 2, "learning_rate": 0.05, "seed": 0}
DIGITS = {"dataset": "digits", "subset": 400}


def tiny_config(tmp_path, **hp):
    return write_config(tmp_path / "exp.yaml", {**TINY, **hp}, DIGITS)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _final_state(out, batches):
    ck = checkpoints(out)[batches]
    return load_state(ck), json.loads((ck / "genotype.json").read_text())


@pytest.mark.slow
def test_same_seed_same_architecture_other_seed_differs(tmp_path):
    cfg = tiny_config(tmp_path)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        ok(run_in_process(str(cfg), "--max-batches", "5", "--set", f"seed={seed}", "--output", str(tmp_path / name),
                          cwd=tmp_path))
        runs[name] = _final_state(tmp_path / name, 5)[1]
    assert runs["a"]["arch_weights"] == runs["b"]["arch_weights"] and runs["a"]["genotype"] == runs["b"]["genotype"]
    assert runs["a"]["arch_weights"] != runs["c"]["arch_weights"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["search", "retrain"])
def test_divergence_stops_before_a_bad_checkpoint(tmp_path, kind):
    """learning_rate 1e6 with a checkpoint after every batch: the run stops with one line naming
    what diverged and the step, and no checkpoint it wrote holds a non-finite tensor (weights,
    BatchNorm statistics, optimizer and architecture state); none is left half-written."""
    hp = {**TINY, "learning_rate": 1.0e6} if kind == "search" else \
        {"genotype": "NB201_RESNET", "space": "nas-bench-201", "global_batch_size": 16, "init_channels": 4, "layers": 1,
         "epochs": 2, "learning_rate": 1.0e6}
    cfg = write_config(tmp_path / "exp.yaml", hp, DIGITS)
    proc = run_model_def(str(cfg), "--max-batches", "30", "--checkpoint-every", "1", "--output", str(tmp_path / "o"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "the run diverged" in err[0] and "lower learning_rate (now 1000000.0)" in err[0], err
    assert re.search(r"not finite at step \d+", err[0])
    ckpts = checkpoints(tmp_path / "o")
    assert max(ckpts, default=0) < 30
    assert len(list((tmp_path / "o" / "determined").iterdir())) == len(ckpts)     # no incomplete leftovers
    for ck in ckpts.values():
        assert first_non_finite({k: v for k, v in load_state(ck).items() if k != "rng_state"}) is None, ck
        if kind == "search":
            weights = json.loads((ck / "genotype.json").read_text())["arch_weights"]
            assert all(math.isfinite(w) for cell in weights.values() for row in cell["ops"] for w in row)


@pytest.mark.parametrize("override,match", [
    ("optimizer=gea", "unknown architecture optimizer 'gea'; valid optimizers: gaea, darts"),
    ("space=nasbench", "unknown search space 'nasbench'"),
    ("learnin_rate=0.1", r"unknown setting\(s\) 'learnin_rate'"),
    ("space_args.width=3", "unknown space_args 'width' for search space 'nas-bench-201'; valid space_args: C, layers"),
    ("optimizer_args.gaea.lrr=0.1", r"unknown setting\(s\) 'lrr' for architecture optimizer 'gaea'"),
    ("data.root=/nonexistent/cifar", "image folder dataset expected"),
])
def test_bad_config_gets_one_line_error(tmp_path, override, match):
    cfg = write_config(tmp_path / "exp.yaml", TINY, {"dataset": "image_folder", "root": "/nonexistent/x"}
                       if override.startswith("data.") else DIGITS)
    proc = run_in_process(str(cfg), "--max-batches", "2", "--set", override, "--output", str(tmp_path / "o"),
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1
    import re
    assert re.search(match, lines[0]), lines[0]


def test_yaml_overrides_and_hyperparameter_points(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("hyperparameters:\n  lr: 1e-3\n  wd: {type: log, minval: -4, maxval: -2, base: 10}\n"
                 "  opt: {type: categorical, vals: [gaea, darts]}\n  n: {type: int, minval: 2, maxval: 6}\n"
                 "  nested: {a: {type: const, val: 3}}\n")
    cfg = load_config(p)
    assert cfg["hyperparameters"]["lr"] == 1e-3 and isinstance(cfg["hyperparameters"]["lr"], float)
    hp = pick_hparams(cfg["hyperparameters"])
    assert hp == {"lr": 1e-3, "wd": pytest.approx(1e-3), "opt": "gaea", "n": 4, "nested": {"a": 3}}
    cfg = apply_overrides(cfg, ["opt=darts", "nested.a=5", "data.subset=100", "space_args.C=8"])
    assert cfg["hyperparameters"]["opt"] == "darts" and cfg["hyperparameters"]["nested"]["a"] == 5
    assert cfg["data"]["subset"] == 100 and cfg["hyperparameters"]["space_args"]["C"] == 8
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["novalue"])


@pytest.mark.slow
@pytest.mark.parametrize("option", ["precision=bf16", "channels_last=true"])
def test_search_options_run_in_the_trial(tmp_path, option):
    cfg = tiny_config(tmp_path, space="darts", space_args={"C": 4, "layers": 3, "partial_channels": 2,
                                                           "edge_normalization": True})
    proc = ok(run_in_process(str(cfg), "--max-batches", "2", "--set", option, "--output", str(tmp_path / "o"),
                             cwd=tmp_path))
    assert "finished at batch 2" in proc.stdout


@pytest.mark.parametrize("policy", ["all", "none", None])
def test_cluster_entry_passes_the_experiments_checkpoint_policy_and_length(monkeypatch, policy):
    """On a cluster the trial runs through Trainer.fit, which reads neither checkpoint_policy nor
    the searcher's length from the experiment itself: the entry point passes both."""
    import contextlib
    from types import SimpleNamespace

    import determined as det

    from nas_trial import runner

    config = {"searcher": {"name": "adaptive_asha", "time_metric": "epochs", "max_time": 7}}
    if policy:
        config["checkpoint_policy"] = policy
    context = SimpleNamespace(get_experiment_config=lambda: config)
    seen = {}

    class FakeTrainer:
        def __init__(self, trial, ctx):
            seen["trial"] = trial

        def fit(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(det.pytorch, "init", lambda hparams: contextlib.nullcontext(context))
    monkeypatch.setattr(det.pytorch, "Trainer", FakeTrainer)
    cfg = SimpleNamespace(validate_every=1, checkpoint_every=2, epochs=50)
    info = SimpleNamespace(trial=SimpleNamespace(hparams={}), latest_checkpoint="uuid-1")
    assert runner.run_cluster(info, lambda hp: (lambda ctx: SimpleNamespace(cfg=cfg))) == 0
    assert seen["checkpoint_policy"] == (policy or "best") and seen["latest_checkpoint"] == "uuid-1"
    assert isinstance(seen["max_length"], det.pytorch.Epoch) and seen["max_length"].value == 7
    assert seen["checkpoint_period"].value == 2 and seen["validation_period"].value == 1


def test_random_search_ranks_on_the_images_one_slot_uses_on_any_slot_count():
    """Random search scores its candidates (on the chief) on eval_batches batches of the global
    batch size, cut as one slot cuts them: with 2 slots of 8 the same images in the same
    batches as with 1 slot of 16, not an eighth of them in short batches."""
    import types

    import torch

    import model_def

    heldout = torch.utils.data.TensorDataset(torch.arange(100), torch.zeros(100, dtype=torch.long))

    def ranking_inputs(per_slot, world):
        trial = types.SimpleNamespace(
            arch=types.SimpleNamespace(settings=types.SimpleNamespace(eval_batches=3)), per_slot=per_slot,
            world=world, eval_batch_size=per_slot * world, data=types.SimpleNamespace(heldout=heldout), seed=0)
        sample = model_def.SearchTrial.random_search_sample(trial)
        return [x.tolist() for x, _ in model_def._Trial.eval_loader(trial, sample, 0)]

    one = ranking_inputs(16, 1)
    assert ranking_inputs(8, 2) == one and [len(b) for b in one] == [16, 16, 16]
    assert len({i for b in one for i in b}) == 48
