"""Runs that survive interruption: resume from any batch into any --output (bitwise equal
to the uninterrupted run on CPU), atomic checkpoints under kill -9 at many points, clean
SIGINT/SIGTERM, and a dead torchrun rank that does not hang the other."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, checkpoints, load_state, run_model_def, write_config

DIGITS = {"dataset": "digits", "subset": 400}
SEARCH = {"global_batch_size": 16, "space": "nas-bench-201", "space_args": {"C": 4, "layers": 1}, "epochs": 2,
          "learning_rate": 0.05, "seed": 0}
RETRAIN = {"genotype": "DARTS_V2", "global_batch_size": 16, "init_channels": 4, "layers": 5, "epochs": 2,
           "drop_path_prob": 0.2, "learning_rate": 0.05, "auxiliary": False}
TOTAL, EVERY = 15, 4        # search: 12 batches per epoch, so a run to 15 crosses an epoch boundary
KEYS = ("models_state_dict", "optimizers_state_dict", "lr_schedulers_state_dict")


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def same_run_state(ck_a: Path, ck_b: Path, last_validation_differs: bool = False) -> None:
    """Weights (architecture weights included), optimizer and LR-schedule state, the trial's
    step count and architecture-optimizer state, the torch RNG, and the genotype file.
    ``last_validation_differs``: random search keeps the result of its last validation, and
    a run stopped early validated where it stopped; compare it from the next validation on."""
    a, b = load_state(ck_a), load_state(ck_b)
    for key in KEYS:
        assert equal(a[key], b[key]), key
    sa, sb = a["callbacks"]["nas_state"], b["callbacks"]["nas_state"]
    if last_validation_differs:
        for s in (sa, sb):
            s["extra"].get("arch", {}).pop("best", None)
    assert equal(sa, sb)
    assert torch.equal(a["rng_state"]["cpu_rng_state"], b["rng_state"]["cpu_rng_state"])
    if (ck_a / "genotype.json").exists() and not last_validation_differs:
        ga, gb = (json.loads((c / "genotype.json").read_text()) for c in (ck_a, ck_b))
        assert ga["genotype"] == gb["genotype"] and ga["arch_weights"] == gb["arch_weights"]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def validations(proc) -> list[int]:
    return [int(s) for s in re.findall(r"validation at step (\d+)", proc.stdout)]


def _config(tmp_path, hparams):
    return write_config(tmp_path / "exp.yaml", hparams, DIGITS)


@pytest.fixture(scope="module")
def gaea_reference(tmp_path_factory):
    """The uninterrupted GAEA search the kill and interrupt tests compare against."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _config(tmp, {**SEARCH, "optimizer": "gaea"})
    proc = ok(run_model_def(str(cfg), "--max-batches", str(TOTAL), "--checkpoint-every", str(EVERY),
                            "--output", str(tmp / "a")))
    return cfg, tmp / "a", proc


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gdas", "random", "retrain"])
def test_resume_mid_epoch_into_a_new_output_is_exact(tmp_path, kind):
    """Stopped at batch 5 (mid-epoch, between checkpoint points), resumed from the run
    directory into a new --output: the same checkpoint and validation points (counted from
    the start of the run: epoch 12, every 4) and the same final state, bit for bit."""
    hparams = {**RETRAIN} if kind == "retrain" else {**SEARCH, "optimizer": kind}
    if kind == "random":        # a cheaper selection at each validation (same code path)
        hparams["optimizer_args"] = {"random": {"candidates": 4, "eval_batches": 2}}
    total = 26 if kind == "retrain" else TOTAL         # retraining: 22 batches per epoch
    cfg = _config(tmp_path, hparams)
    common = ["--max-batches", str(total), "--checkpoint-every", str(EVERY)]
    a = ok(run_model_def(str(cfg), *common, "--output", str(tmp_path / "a")))
    ok(run_model_def(str(cfg), "--max-batches", "5", "--checkpoint-every", str(EVERY), "--output", str(tmp_path / "b")))
    c = ok(run_model_def(str(cfg), *common, "--output", str(tmp_path / "c"), "--resume", str(tmp_path / "b")))
    assert "resuming from the newest complete checkpoint" in c.stdout and "resuming at batch 5" in c.stdout
    epoch = 22 if kind == "retrain" else 12
    # every 4 batches, and (Determined's local policy "all") after every validation: each epoch and at the end
    expected_ckpts = set(range(EVERY, total + 1, EVERY)) | {epoch, total}
    assert set(checkpoints(tmp_path / "a")) == expected_ckpts and validations(a) == [epoch, total]
    assert set(checkpoints(tmp_path / "c")) == {n for n in expected_ckpts if n > 5}
    assert validations(c) == [v for v in validations(a) if v > 5]
    for n in checkpoints(tmp_path / "c"):
        same_run_state(checkpoints(tmp_path / "a")[n], checkpoints(tmp_path / "c")[n],
                       last_validation_differs=n < epoch)


@pytest.mark.slow
def test_kill_at_many_points_then_resume_from_the_run_directory(tmp_path, gaea_reference):
    """One run killed (SIGKILL, by its own fault switch) at six points, training steps and each
    phase of a checkpoint write, each time resumed from its run directory: every complete
    checkpoint survives each kill, incomplete ones are never taken, and the end is bitwise
    the uninterrupted run."""
    cfg, ref, _ = gaea_reference
    out = tmp_path / "run"
    args = [str(cfg), "--max-batches", str(TOTAL), "--checkpoint-every", str(EVERY), "--output", str(out)]
    points = ["step@6", "save_start@8", "torch_save@8", "files@8", "progress@8", "progress@12"]
    tried = []
    for i, point in enumerate(points):
        before = {n: (p, (p / "state_dict.pth").read_bytes()) for n, p in checkpoints(out).items()} \
            if out.exists() else {}
        proc = run_model_def(*args, *(["--resume", str(out)] if i else []), env={"NAS_FAULT_KILL": point})
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
        after = checkpoints(out)
        for n, (p, data) in before.items():          # earlier checkpoints intact
            assert after[n] == p and (p / "state_dict.pth").read_bytes() == data
        incomplete = [d for d in (out / "determined").iterdir() if d not in after.values()]
        if point.split("@")[0] in ("save_start", "torch_save", "files", "progress"):
            assert incomplete, point                  # the interrupted checkpoint is there, unmarked
            bad = run_model_def(str(cfg), "--max-batches", str(TOTAL), "--output", str(tmp_path / "x"),
                                "--resume", str(incomplete[-1])) if point == "torch_save@8" else None
            if bad is not None:
                lines = bad.stderr.strip().splitlines()
                assert bad.returncode == 2 and len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
                assert "incomplete checkpoint" in lines[0] and str(checkpoints(out)[4]) in lines[0]
                assert not (tmp_path / "x").exists()
        tried.append(point)
    final = ok(run_model_def(*args, "--resume", str(out)))
    assert "resuming at batch 8" in final.stdout           # progress@12 left 12 incomplete
    for n in (8, TOTAL):
        same_run_state(checkpoints(ref)[n], checkpoints(out)[n])
    assert len(tried) == len(points)


def _start(args, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "model_def.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM])       # SIGINT: the torchrun test below
def test_interrupt_checkpoints_and_prints_the_resume_command(tmp_path, gaea_reference, sig):
    cfg, ref, _ = gaea_reference
    out = tmp_path / "run"
    proc = _start([str(cfg), "--max-batches", str(TOTAL), "--checkpoint-every", str(EVERY), "--output", str(out)],
                  env={"NAS_FAULT_STEP_DELAY": "0.3"})
    # wait until it trains (the second checkpoint is there), then interrupt it
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and (out / "determined").exists()
                                               and 8 in checkpoints(out)):
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and f"stopped by {sig.name} at batch" in lines[0], stderr[-2000:]
    stopped = int(re.search(r"at batch (\d+)", lines[0]).group(1))
    assert 8 <= stopped < TOTAL and stopped in checkpoints(out)
    command = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert command[:2] == ["python", "model_def.py"]
    resumed = ok(subprocess.run([sys.executable, str(ROOT / "model_def.py"), *command[2:]], capture_output=True,
                                text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    assert f"resuming at batch {stopped}" in resumed.stdout
    same_run_state(checkpoints(ref)[TOTAL], checkpoints(out)[TOTAL])


@pytest.mark.slow
def test_a_dead_rank_does_not_hang_the_other(tmp_path):
    cfg = _config(tmp_path, {**SEARCH, "optimizer": "gaea", "epochs": 50})
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29500 + os.getpid() % 1000), str(ROOT / "model_def.py"), str(cfg), "--checkpoint-every", "3",
         "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "NAS_FAULT_STEP_DELAY": "0.2"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and (out / "determined").exists() and checkpoints(out)):
        time.sleep(0.1)
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "model_def.py"], capture_output=True, text=True)
    pids = [int(p) for p in ranks.stdout.split()]
    assert len(pids) == 2, ranks
    rank = {p: dict(kv.split("=", 1) for kv in open(f"/proc/{p}/environ").read().split("\0") if "=" in kv)["RANK"]
            for p in pids}
    os.kill(next(p for p in pids if rank[p] == "1"), signal.SIGKILL)
    t0 = time.monotonic()
    stdout, stderr = proc.communicate(timeout=90)
    assert time.monotonic() - t0 < 60 and proc.returncode != 0
    said = [l for l in stderr.splitlines() if l.startswith("error:")]
    # gloo notices the closed connection, or (blocked elsewhere) torchrun's SIGTERM and the grace timer end it
    assert len(said) == 1 and re.search("another process of this run (stopped|may have died)", said[0]), stderr
    assert "last complete checkpoint is" in said[0]
    good = checkpoints(out)
    assert good
    for ck in good.values():
        load_state(ck)


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_both_ranks_at_one_checkpoint(tmp_path):
    """SIGINT to the whole process group (torchrun and both ranks), as Ctrl-C in a terminal
    sends it: the ranks agree at the next reporting boundary, write one checkpoint there and
    exit with the resume command."""
    cfg = _config(tmp_path, {**SEARCH, "optimizer": "gaea", "epochs": 50})
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29500 + (os.getpid() + 7) % 1000), str(ROOT / "model_def.py"), str(cfg), "--checkpoint-every", "1000",
         "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "NAS_FAULT_STEP_DELAY": "0.2"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "tensorboard").exists():
        time.sleep(0.1)
    time.sleep(3)                                   # training by now
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=90)
    said = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(said) == 1 and "stopped by SIGINT at batch" in said[0], stderr[-3000:]
    stopped = int(re.search(r"at batch (\d+)", said[0]).group(1))
    # a reporting boundary: every 10 batches, and where a validation cuts a workload (each epoch of 12)
    assert (stopped % 10 == 0 or stopped % 12 == 0) and max(checkpoints(out)) == stopped
    assert "--resume" in said[0] and 'model_def.py", line' not in stderr      # no traceback from a rank


def test_one_process_checks_the_checkpoint_itself():
    """On one process a checkpoint can come between reporting boundaries (a local Ctrl-C), so
    the checkpoint's own tensors and the pending step flags are checked as it is written: the
    run leaves as on several processes (the early exit reported, no exit checkpoint)."""
    import types

    import determined as det

    from nas_trial.faults import Faults
    from nas_trial.health import Health

    reports = []
    dist = types.SimpleNamespace(get_size=lambda: 1, get_rank=lambda: 0)
    context = types.SimpleNamespace(distributed=dist, _core=types.SimpleNamespace(
        train=types.SimpleNamespace(report_early_exit=reports.append)))
    trial = types.SimpleNamespace(steps=7, context=context, faults=Faults(""))
    h = Health(trial, "lower learning_rate")
    h.on_checkpoint_save_start({"models_state_dict": [{"bn.running_var": torch.ones(2)}]})
    with pytest.raises(det.pytorch._ShouldExit):
        h.on_checkpoint_save_start({"models_state_dict": [{"bn.running_var": torch.tensor([1.0, float("inf")])}]})
    assert h.diverged == ("the run diverged: models_state_dict[0].bn.running_var is not finite at step 7; no "
                          "checkpoint holding it was written; lower learning_rate")
    h.record(7, "the training loss", torch.tensor(False))
    with pytest.raises(det.pytorch._ShouldExit):
        h.on_checkpoint_save_start({"models_state_dict": [{"bn.running_var": torch.ones(2)}]})
    assert "the training loss is not finite at step 7" in h.diverged
    assert reports == [det.core.EarlyExitReason.INVALID_HP] * 2
